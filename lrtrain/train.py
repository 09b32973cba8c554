"""The training loop: `train(build_run(config), workdir)`.

`build_run(config)` -> `Run`: the config validated (config_utils.validate),
the data loaded, the model and its initial params built (rank limits are
checked here), the optimizer (optim.build) and the integrator the config
names (integrators.build); nothing touches a workdir. A study replaces
parts of the `Run` (initial params, dataset, integrator, extra hooks).

`train(run, workdir)` (or `train([run per seed], [workdir per seed])`: the
same loop with a leading seed axis and the step vmapped over it):

  1. lock the workdir (lrtrain/workdir.py; a workdir in use is refused),
     refuse one holding a run of another config (unless config.overwrite),
     restore the latest checkpoint if any (a corrupt one raises, or under
     train.restore_fallback gives way to the newest intact one, with a
     warning), write config.json; a fresh run logs step 0 (the initial
     ranks and the hooks marked `at_start`, the diagnostics);
  2. loop: host batch -> device (batch axis over the mesh's "data" axis,
     params and optimizer state placed by lrtrain/sharding.py's rules) ->
     jitted integrator step (buffers donated) -> host-side `resize`
     (capacity buckets; skipped for fixed-shape integrators under vmap) ->
     metrics of the previous step fetched after the next step is
     dispatched -> NaN/Inf guard and `BlowupGuard` -> the periodic `Hook`s
     (validation, diagnostics, the run's own, checkpoint), one cadence
     rule for all;
  3. test evaluation, summary.json, plots/.

Every file but the checkpoints is written by process 0 alone, through the
run's writer (`writers.open_run`); orbax coordinates checkpoint saves over
all processes.

`train_and_evaluate(config, workdir)` is steps 0-3 for one config, after
`workdir.check` (a workdir that is a file, not writable or in use ends
before the data and model are built).

Axis legend: b = batch, T = sequence length, k = classes (or vocab).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from lrtrain import checkpoint as ckpt_lib
from lrtrain import config_utils
from lrtrain import factorizations as fz
from lrtrain import optim
from lrtrain import sharding as sharding_lib
from lrtrain import workdir as workdir_lib
from lrtrain import writers as writers_lib
from lrtrain.integrators import base as ibase
from lrtrain.integrators import linalg

WorkdirError = workdir_lib.WorkdirError
fingerprint = workdir_lib.fingerprint
prepare_workdir = workdir_lib.prepare_workdir


def periodic(step: int, every: int, total: int) -> bool:
  """The one cadence rule: every `every`-th step (never when every <= 0)
  and the last one."""
  return step == total or (every > 0 and step % every == 0)


class DivergedError(FloatingPointError):
  """Loss or parameters became NaN/Inf (or blew up, under train.blowup=error)."""


class BlowupGuard:
  """Finite divergence of the train loss, judged at each logged step.

  A loss that explodes without reaching Inf (e.g. 1e19 after too large a
  learning rate) passes the NaN/Inf guard and would end as a "finished"
  run. The guard sees every step's loss; the first one (the loss at the
  initial or resumed params) and each logged loss that is not itself
  suspect form the baseline. A logged loss above `FACTOR` times the
  baseline's median and above the first loss is suspect (the second
  condition keeps a loss near zero from flagging its noise); `PATIENCE`
  consecutive suspect log periods are a blow-up. `mode` (train.blowup): "warn" logs one warning line for
  the run (step, loss, median, lower optimizer.learning_rate), "error"
  raises DivergedError with that text, "off" checks nothing.
  """
  FACTOR = 10.0
  PATIENCE = 3

  def __init__(self, mode: str, learning_rate: float, *, every: int,
               total: int):
    self.mode, self.lr, self.every, self.total = mode, learning_rate, every, total
    self.baseline: list[float] = []
    self.streak = 0
    self.done = mode == "off"

  def __call__(self, step: int, loss: float) -> None:
    if self.done:
      return
    if not self.baseline:
      self.baseline.append(loss)
      return
    if not periodic(step, self.every, self.total):
      return
    median = float(np.median(self.baseline))
    if not loss > max(self.FACTOR * abs(median), self.baseline[0]):
      self.baseline.append(loss)
      self.streak = 0
      return
    self.streak += 1
    if self.streak < self.PATIENCE:
      return
    msg = (f"train loss {loss:.3g} at step {step} has been above "
           f"{self.FACTOR:g}x its running median {median:.3g} for "
           f"{self.PATIENCE} log periods: the run is blowing up; lower "
           f"optimizer.learning_rate (now {self.lr:g})")
    if self.mode == "error":
      raise DivergedError(msg)
    logging.warning("%s (train.blowup=error stops such runs)", msg)
    self.done = True


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during `train`: `step` reached, `checkpoint` the latest step
  saved (None: none yet), where a rerun resumes."""

  def __init__(self, step: int, checkpoint: int | None):
    super().__init__(step, checkpoint)
    self.step, self.checkpoint = step, checkpoint

  def __str__(self) -> str:
    return (f"interrupted at step {self.step}; rerun the same command to "
            + (f"resume from step {self.checkpoint}"
               if self.checkpoint is not None
               else "start again (no checkpoint saved yet)"))


# --------------------------------------------------------------------------
# Setup helpers.
# --------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when a multi-process environment is set.

  Either a cluster jax detects itself (SLURM with more than one task), or
  JAX_COORDINATOR_ADDRESS (host:port of process 0's coordinator) with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (this process's index, 0-based),
  which jax does not read itself and are passed on here; e.g. two
  processes on one machine:

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 \
    JAX_PROCESS_ID=0 python -m lrtrain.main ...     (and JAX_PROCESS_ID=1)
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env or "COORDINATOR_ADDRESS" in env:
    kw = {}
    if "JAX_NUM_PROCESSES" in env:
      kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
      kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=env.get("JAX_COORDINATOR_ADDRESS",
                                    env.get("COORDINATOR_ADDRESS")), **kw)
  elif "SLURM_NTASKS" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    # jaxlib 0.10's CPU client: with a warm persistent compilation cache
    # (JAX_COMPILATION_CACHE_DIR) the processes of one run load executables
    # that process 0 compiled and wrote, and the first step's collectives
    # never complete (two processes, mesh (4, 2): every run after the one
    # that filled the cache hung). Each process compiles for itself.
    if jax.config.jax_enable_compilation_cache and (
        jax.config.jax_compilation_cache_dir):
      logging.warning("persistent compilation cache off: processes on the "
                      "CPU backend hang on executables another process "
                      "compiled")
    jax.config.update("jax_enable_compilation_cache", False)


def num_steps(config, ds) -> int:
  """Total optimizer steps of the run."""
  t = config.train
  if t.num_steps > 0:
    return int(t.num_steps)
  per_epoch = max(ds.num_examples("train") // t.batch_size, 1)
  return int(t.num_epochs * per_epoch)


def integrator_kwargs(config) -> dict[str, Any]:
  """config.integrator as keyword arguments of integrators.build: the
  block's fields the method takes (the block is shared by every method)."""
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  accepted = integrators.options(config.integrator.name)
  kw = {k: v for k, v in config.integrator.to_dict().items() if k in accepted}
  kw["weight_decay"] = optim.integrator_weight_decay(config.optimizer)
  return kw


def make_loss_fn(model, task: str):
  """loss_fn(params, batch) -> (mean loss, {"accuracy"}) for the task."""
  def loss_fn(params, batch):
    out = model.apply({"params": params}, batch["x"], train=False)
    loss, correct = per_example(out, batch["y"], task)
    return jnp.mean(loss), {"accuracy": jnp.mean(correct)}
  return loss_fn


def per_example(out, y, task: str):
  """(loss, correct) per example (token-averaged for lm)."""
  if task == "regression":
    err = jnp.square(out.astype(jnp.float32) - y.reshape(out.shape))
    loss = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    return loss, jnp.zeros_like(loss)
  logits = out.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(jnp.int32))
  hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  if ce.ndim > 1:                       # (b, T) for the char LM
    ce, hit = ce.mean(axis=tuple(range(1, ce.ndim))), hit.mean(
        axis=tuple(range(1, hit.ndim)))
  return ce, hit


def param_counts(params) -> dict[str, float]:
  """Trainable / deployed / dense-equivalent parameter counts."""
  tot = {"train": 0, "eval": 0, "dense": 0}
  for x in jax.tree.leaves(params, is_leaf=fz.is_factor):
    if fz.is_factor(x):
      c = (int(fz.num_params(x, True)), int(fz.num_params(x, False)),
           int(fz.dense_num_params(x)))
    elif ibase.is_float(x):
      c = (int(np.prod(x.shape)),) * 3
    else:
      continue
    for k, v in zip(("train", "eval", "dense"), c):
      tot[k] += v
  tot["compression"] = 1.0 - tot["eval"] / max(tot["dense"], 1)
  return tot


def host_ranks(params) -> dict[str, Any]:
  """rank/<layer> as host ints (lists for Tucker)."""
  return {k: np.asarray(v).tolist() for k, v in
          jax.device_get(ibase.rank_aux(params)).items()}


def _float_paths(params) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [fz.path_str(p) for p, x in leaves if ibase.is_float(x)]


def _finite_flags(params) -> jax.Array:
  """(num float leaves,) bool: all entries finite."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)
                    if ibase.is_float(x)])


class Sharder:
  """Where a run's arrays live: the (data, model) mesh of `config.mesh`
  (`lrtrain/sharding.py`: the mesh and the rules per parameter kind);
  params and optimizer state placed by the rules, the batch axis split
  over "data". The default mesh (data=-1, model=1) is data parallel:
  everything replicated, the batch split over all devices."""

  def __init__(self, mesh_config=None):
    self.mesh = sharding_lib.make_mesh(mesh_config)
    self.rules = sharding_lib.Placement(self.mesh)
    self.data = self.rules.batch_sharding()
    self.seeds = self.rules.batch_sharding(seed_axis=True)
    self.repl = NamedSharding(self.mesh, P())
    self.n = self.rules.data_size            # ways the batch is split

  def replicate(self, tree, lead: int = 0):
    """A params tree placed by the rules (`place` for params with their
    optimizer state); `lead` leading seed axes stay whole."""
    return self.rules.place(tree, None, lead)[0]

  def place(self, params, state, lead: int = 0):
    """(params, optimizer state) placed by the rules."""
    return self.rules.place(params, state, lead)

  def constrain(self, params, state, lead: int = 0):
    """`place` inside the jitted step: its outputs keep the layout."""
    return self.rules.constrain(params, state, lead)

  def batch(self, batch: dict[str, np.ndarray], seed_axis: bool = False):
    """A global host batch -> a sharded global array, of which this process
    supplies the rows its devices hold (its slice of the data axis).
    With `seed_axis` the arrays are (seeds, b, ...) and b is the split axis."""
    sharding = self.seeds if seed_axis else self.data
    ax = int(seed_axis)

    def put(a):
      a = np.asarray(a)
      idx = sharding.addressable_devices_indices_map(a.shape).values()
      lo = min(i[ax].start or 0 for i in idx)
      hi = max(a.shape[ax] if i[ax].stop is None else i[ax].stop for i in idx)
      local = a[(slice(None),) * ax + (slice(lo, hi),)]
      return jax.make_array_from_process_local_data(sharding, local, a.shape)
    return {k: put(v) for k, v in batch.items()}


# --------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------


def make_eval_fn(model, task: str):
  """Jitted (params, batch, weights) -> (sum loss, sum correct, count)."""
  @jax.jit
  def eval_fn(params, batch, w):
    out = model.apply({"params": params}, batch["x"], train=False)
    loss, hit = per_example(out, batch["y"], task)
    return jnp.sum(loss * w), jnp.sum(hit * w), jnp.sum(w)
  return eval_fn


def evaluate(eval_fn, params, ds, split: str, batch_size: int,
             sharder: Sharder) -> dict[str, float]:
  """Mean loss (and accuracy) over one ordered pass of `split`; the last
  partial batch is padded to the fixed shape (one compile) and masked."""
  bs = -(-batch_size // sharder.n) * sharder.n
  tot = np.zeros(3)
  for batch in ds.batches(split, bs, seed=0, shuffle=False):
    k = len(batch["y"])
    w = np.zeros(bs, np.float32)
    w[:k] = 1.0
    padded = {key: np.concatenate([v, np.repeat(v[-1:], bs - k, 0)]) if k < bs
              else v for key, v in batch.items()}
    dev = sharder.batch({**padded, "w": w})
    w_dev = dev.pop("w")
    tot += np.asarray(jax.device_get(eval_fn(params, dev, w_dev)))
  if tot[2] == 0:
    return {}
  out = {"loss": tot[0] / tot[2]}
  if ds.task != "regression":
    out["accuracy"] = tot[1] / tot[2]
  if ds.task == "lm":
    out.update(lm_metrics(out["loss"], byte_level=ds.meta.get("byte_level", False)))
  return out


def lm_metrics(loss: float, *, byte_level: bool) -> dict[str, float]:
  """Language-model metrics of a token-mean cross-entropy `loss` (nats):
  perplexity exp(loss) and, where a token is one byte, bits_per_byte
  loss / ln 2."""
  with np.errstate(over="ignore"):
    out = {"perplexity": float(np.exp(np.float64(loss)))}
  if byte_level:
    out["bits_per_byte"] = float(loss) / float(np.log(2.0))
  return out


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  """A run built from its config: everything but the workdir.

  `train` takes it and never looks at a method name. A study builds one
  with `build_run` and replaces what it changes (initial params, the
  dataset, the integrator, extra hooks, where in the data stream step 0
  starts) with `run.replace(...)` before calling `train`.
  """
  config: ml_collections.ConfigDict
  ds: Any
  model: Any
  init_params: Any                  # capacity = rank; `train` buckets them
  loss_fn: Callable
  integrator: ibase.Integrator
  tx: optax.GradientTransformation
  total: int                        # optimizer steps
  start_step: int = 0               # data-stream position of step 0
  hooks: tuple = ()                 # extra `Hook`s (metrics of their own)

  def replace(self, **changes) -> "Run":
    return dataclasses.replace(self, **changes)


def build_run(config: ml_collections.ConfigDict) -> Run:
  """The `Run` of a config (nothing touches a workdir).

  Raises:
    ConfigError, lrtrain.data.DatasetError, ValueError (rank too large).
  """
  from lrtrain import data as data_lib  # pylint: disable=g-import-not-at-top
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  from lrtrain import models  # pylint: disable=g-import-not-at-top
  config_utils.validate(config)
  ds = data_lib.load(config.data)
  n_train = ds.num_examples("train")
  if config.train.batch_size > n_train:
    raise config_utils.ConfigError(
        f"train.batch_size={config.train.batch_size} exceeds the "
        f"{n_train} training examples of data.name={config.data.name!r} "
        "(a batch would repeat examples); lower it or raise data.max_train")
  model = models.build(config.model, num_classes=ds.num_classes,
                       input_shape=tuple(ds.input_shape))
  key = jax.random.key(config.seed)
  x0 = np.zeros((1, *ds.input_shape),
                np.int32 if ds.task == "lm" else np.float32)
  params = jax.jit(lambda k: model.init(k, x0, train=False)["params"])(key)
  if config.model.init_from:
    from lrtrain import pretrained  # pylint: disable=g-import-not-at-top
    params = pretrained.start(config, params, ds.num_classes,
                              tuple(ds.input_shape))
  total = num_steps(config, ds)
  tx = optim.build(config.optimizer, total)
  integ = integrators.build(config.integrator.name, tx,
                            **integrator_kwargs(config))
  jax.eval_shape(integ.init, params)   # the method can train this model
  return Run(config=config, ds=ds, model=model, init_params=params,
             loss_fn=make_loss_fn(model, ds.task), integrator=integ, tx=tx,
             total=total)


def train_batches(run: Run, step: int):
  """The run's train stream from the batch that step `step` + 1 trains on
  (deterministic in the seed and the position: a resume restarts it here)."""
  return run.ds.batches("train", run.config.train.batch_size,
                        seed=run.config.seed, start_step=run.start_step + step)


def _cache_size(jitted) -> int | None:
  """Compiled variants of a jitted function (one per input shape set: each
  capacity-bucket change of a rank-adaptive run adds one); None if this jax
  does not expose the count."""
  size = getattr(jitted, "_cache_size", None)
  return int(size()) if callable(size) else None



# --------------------------------------------------------------------------
# Periodic hooks and one run directory's host-side state.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(step, params, opt_state) -> metrics dict or None`, called after
  every `every`-th step (never when `every` <= 0) and after the last step,
  and with `at_start` also at step 0 of a fresh run (the state training
  starts from; a resumed run logged it already); a dict it returns is
  written to the run's metrics at that step."""
  every: int
  fn: Callable[[int, Any, Any], dict | None]
  at_start: bool = False

  def due(self, step: int, total: int) -> bool:
    if step == 0:
      return self.at_start
    return periodic(step, self.every, total)


@contextlib.contextmanager
def _ctrl_c_after():
  """Run the block to its end; a Ctrl-C (SIGINT) during it is raised as
  KeyboardInterrupt after it (outside the main thread: no deferral)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if caught:
    raise KeyboardInterrupt


class _RunDir:
  """One run's workdir, checkpoints, writer and hooks (a vmapped-seed run
  has one per seed)."""

  def __init__(self, run: Run, workdir: str, eval_fn, sharder: Sharder):
    c = run.config
    self.lock = workdir_lib.Lock(workdir).acquire()   # before any read
    try:
      prepare_workdir(c, workdir)
      self.ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                                        c.train.max_to_keep)
    except BaseException:
      self.lock.release()
      raise
    self.run, self.workdir, self.fp = run, workdir, fingerprint(c)
    self.rng = jax.random.key_data(jax.random.key(c.seed))
    self.last_good = None
    self.writer = None
    t = c.train

    def validation(step, params, _):
      ev = evaluate(eval_fn, params, run.ds, "validation", t.eval_batch_size,
                    sharder)
      return {f"eval/{k}": v for k, v in ev.items()}

    def save(step, params, opt_state):
      with _ctrl_c_after():     # a save interrupted half-way is no checkpoint
        self.ckpts.save(step, params=params, opt_state=opt_state, rng=self.rng,
                        fingerprint=self.fp)
        self.last_good = step

    self.hooks = [Hook(t.eval_every, validation)]
    d = c.diagnostics
    if d.enabled and d.every > 0:
      from lrtrain import diagnostics  # pylint: disable=g-import-not-at-top
      diag = diagnostics.Diagnostics(run.init_params, top_k=d.top_k, eps=d.eps,
                                     full_spectrum=d.full_spectrum,
                                     heavy_tail=d.heavy_tail)
      dyn = (diagnostics.GradientDiagnostics(
          run.loss_fn, gradients=d.gradients, updates=d.updates,
          top_k=d.update_k) if d.gradients or d.updates else None)

      def diagnose(step, params, _):
        out = diag(params)
        if dyn is not None:
          # The gradient keys: at the params after `step`, on the batch the
          # next step trains on.
          batch = (sharder.batch(next(train_batches(run, step)))
                   if dyn.needs_batch else None)
          out.update(dyn(params, batch))
        return out
      self.hooks.append(Hook(d.every, diagnose, at_start=True))
    self.hooks += list(run.hooks)
    self.hooks.append(Hook(t.checkpoint_every, save))   # after the metrics

  def start(self, step: int | None):
    """(params, opt_state) at `step` (restored) or fresh and bucketed (None);
    then config.json, and metrics.jsonl cut back to the resumed step."""
    integ, run = self.run.integrator, self.run
    if step is None:
      # First bucketing (capacity >= 2r for rank-adaptive methods), then
      # the optimizer state on the bucketed shapes.
      params, _, _ = integ.resize(run.init_params, None)
      opt_state = integ.init(params)
    else:
      # latest step -> params (saved shapes) -> optimizer-state structure
      # from those params -> its leaves -> data position = step -> RNG.
      meta, leaves = self.ckpts.restore_leaves(step)
      g = meta["groups"]
      params = ckpt_lib.rebuild(run.init_params, leaves["params"],
                                g["params"]["paths"], "params")
      params = jax.tree.map(jnp.asarray, params)
      like = jax.eval_shape(integ.init, params)
      opt_state = ckpt_lib.rebuild(like, leaves["opt_state"],
                                   g["opt_state"]["paths"], "optimizer state")
      self.rng = leaves["rng"][0]
      self.last_good = step
      logging.info("resumed from step %d in %s", step, self.ckpts.directory)
    self.writer = writers_lib.open_run(
        self.workdir, tensorboard=run.config.logging.tensorboard,
        resume_step=step)
    self.writer.write_file("config.json", run.config.to_json(indent=2))
    return params, opt_state

  def run_hooks(self, step: int, params, opt_state) -> dict:
    """The hooks due at `step`, in order; each one's metrics are written
    when it returns (before the checkpoint hook saves). Returns them all."""
    written = {}
    for h in self.hooks:
      if h.due(step, self.run.total):
        out = h.fn(step, params, opt_state)
        if out:
          self.writer.write(step, out)
          written.update(out)
    return written

  def close(self):
    try:
      if self.writer is not None:
        self.writer.close()
      self.ckpts.close()
    finally:
      self.lock.release()


def _start(dirs: Sequence[_RunDir], fallback: bool):
  """(step, [(params, opt_state) per run dir]) from the latest step every
  run directory has saved (step None: none, start fresh).

  A corrupt checkpoint raises, unless `fallback` (train.restore_fallback):
  then the newest earlier intact step is used and the corrupt newer ones
  are moved aside (`Checkpoints.set_aside`: kept for inspection, and a
  later save of their step cannot clash), with a warning naming them and
  the step used; never silently. When no intact step is left nothing is
  moved and the error of the newest one is raised (a fresh start would
  discard the run's progress unasked).
  """
  common = None
  for d in dirs:
    steps = set(d.ckpts.all_steps())
    common = steps if common is None else common & steps
  candidates = sorted(common or (), reverse=True)
  if not candidates:
    return None, [d.start(None) for d in dirs]
  corrupt = []
  for step in candidates:
    try:
      states = [d.start(step) for d in dirs]
    except ckpt_lib.CorruptCheckpointError as e:
      if not fallback:
        raise
      corrupt.append(e)
      for d in dirs:        # the ones that restored it start again below
        if d.writer is not None:
          d.writer.close()
          d.writer = None
      continue
    for e in corrupt:
      aside = [d.ckpts.set_aside(e.step) for d in dirs][0]
      logging.warning("checkpoint step %d is corrupt (%s); moved to %s, "
                      "resuming from step %d (train.restore_fallback)",
                      e.step, e.problem, aside, step)
    return step, states
  raise ckpt_lib.CheckpointError(
      f"no intact checkpoint in {dirs[0].ckpts.directory}: steps "
      f"{', '.join(str(e.step) for e in corrupt)} are corrupt (newest: "
      f"{corrupt[0].problem}); delete checkpoints/ to start afresh or use "
      "another workdir")


def finish_run(d: _RunDir, eval_fn, params, sharder: Sharder, *, steps: int,
               t_start: float, rates: dict) -> dict:
  """Test evaluation, summary.json and plots/ of a finished run."""
  run = d.run
  test = evaluate(eval_fn, params, run.ds, "test", run.config.train.eval_batch_size,
                  sharder)
  counts = param_counts(params)
  summary = {
      "steps": int(steps),
      "test/accuracy": test.get("accuracy"),
      "test/loss": test.get("loss"),
      **{f"test/{k}": v for k, v in test.items() if k not in ("loss", "accuracy")},
      "params/train": counts["train"],
      "params/eval": counts["eval"],
      "params/dense": counts["dense"],
      "params/compression": counts["compression"],
      "ranks": host_ranks(params),
      "time/wall_s": time.time() - t_start,
      **rates,
      "integrator": run.config.integrator.name,
      "devices": jax.device_count(),
      "mesh": sharder.rules.describe(),
  }
  test_row = {f"test/{k}": float(v) for k, v in test.items()}
  d.writer.write(steps, test_row)
  d.writer.write_hparams(run.config.to_dict(), sorted(test_row))
  d.writer.write_file("summary.json", json.dumps(
      writers_lib.to_json_value_tree(summary), indent=2))
  d.writer.close()
  try:
    d.writer.render_plots()
  except Exception as e:  # plots never fail a finished run
    logging.warning("plots failed: %s", e)
  return summary


# --------------------------------------------------------------------------
# The training loop.
# --------------------------------------------------------------------------


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _slice(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def _check_seeds(runs: Sequence[Run]) -> None:
  """Several runs train as one vmapped program only if they differ in seed
  alone and their integrator keeps shapes fixed."""
  fps = {json.dumps({**json.loads(fingerprint(r.config)), "seed": 0})
         for r in runs}
  same = {(r.total, r.start_step, r.config.train.to_json()) for r in runs}
  if (len(fps) != 1 or len(same) != 1
      or not all(r.integrator.fixed_shape for r in runs)):
    raise config_utils.ConfigError(
        "vmapped seeds need runs of a fixed-shape method (integrator not "
        "rank-adaptive) whose configs differ only in seed")


def make_step_fn(integ: ibase.Integrator, loss_fn, sharder: Sharder, *,
                 vmapped: bool = False):
  """The jitted step of the loop: (params, opt_state, batch) -> (params,
  opt_state, aux with "finite" flags, "param_norm", "learning_rate"); params
  and state donated, and placed on the way out by `sharder`'s rules (from
  the traced shapes), so every step starts from the same layout. vmapped:
  a leading seed axis on all three."""

  def train_step(params, state, batch):
    new, state, aux = integ.step(loss_fn, params, state, batch)
    aux = dict(aux)
    aux["param_norm"] = optax.tree.norm(ibase.trainable(new))
    lr = optim.learning_rate(state)
    if lr is not None:
      aux["learning_rate"] = lr
    aux["finite"] = _finite_flags(new) & jnp.isfinite(aux["loss"])
    return new, state, aux

  seeds_step = jax.vmap(train_step)

  def placed_step(*args):
    # Householder QR of a row-split factor as TSQR (no gather of the factor).
    with linalg.row_sharded(sharder.mesh):
      new, state, aux = (seeds_step if vmapped else train_step)(*args)
    new, state = sharder.constrain(new, state, int(vmapped))
    return new, state, aux

  return jax.jit(placed_step, donate_argnums=(0, 1))


def train(runs: Run | Sequence[Run], workdirs: str | Sequence[str]):
  """Train, evaluate and write the workdir contract of one run, or of
  several seeds of one configuration as one vmapped program.

  With a sequence of runs (configs equal but `seed`, a fixed-shape
  integrator) params, optimizer state and batch carry a leading seed axis
  and the step is vmapped over it; each seed keeps its own init, data order,
  workdir, checkpoints and hooks. Everything else is the same loop.

  Returns:
    The summary dict (a list of them for a sequence of runs).

  Raises:
    ConfigError (seeds that differ in more than the seed), WorkdirError,
    CheckpointError (corrupt checkpoint), DivergedError (NaN/Inf),
    Interrupted (Ctrl-C; the step reached and the checkpoint to resume from).
  """
  t_start = time.time()
  single = isinstance(runs, Run)
  runs = [runs] if single else list(runs)
  workdirs = [workdirs] if single else list(workdirs)
  for w in workdirs:
    workdir_lib.check(w)
  vmapped = len(runs) > 1
  if vmapped:
    _check_seeds(runs)
  r0 = runs[0]
  integ, loss_fn, total, t = r0.integrator, r0.loss_fn, r0.total, r0.config.train
  sharder = Sharder(r0.config.get("mesh"))
  lead = int(vmapped)                 # the seed axis stays whole
  eval_fn = make_eval_fn(r0.model, r0.ds.task)
  dirs, progress, step = [], None, 0
  try:
    for r, w in zip(runs, workdirs):
      dirs.append(_RunDir(r, w, eval_fn, sharder))
    resumed, starts = _start(dirs, r0.config.train.restore_fallback)
    step = resumed or 0
    lane = (lambda tree, i: _slice(tree, i)) if vmapped else (lambda tree, i: tree)
    if vmapped:
      params, opt_state = _stack([p for p, _ in starts]), _stack([s for _, s in starts])
    else:
      params, opt_state = starts[0]
    params, opt_state = sharder.place(params, opt_state, lead)
    del starts
    paths = _float_paths(lane(params, 0))
    if resumed is None:       # step 0: the ranks and the at_start hooks
      for i, d in enumerate(dirs):
        p_i = lane(params, i)
        ranks = host_ranks(p_i)
        if ranks:
          d.writer.write(0, ranks)
        d.run_hooks(0, p_i, lane(opt_state, i))

    step_fn = make_step_fn(integ, loss_fn, sharder, vmapped=vmapped)
    iters = [train_batches(r, step) for r in runs]
    # The one producer of steps/s (progress bar, ETA, time/steps_per_sec).
    meter = writers_lib.StepRate()
    progress = writers_lib.Progress(
        total, step, meter=meter,
        enabled=r0.config.logging.progress and writers_lib.is_writer())
    blowup = BlowupGuard(t.blowup, r0.config.optimizer.learning_rate,
                         every=t.log_every, total=total)
    t_loop, step0 = time.time(), step
    # Steady rate: from the end of the first (compiling) step to the end of
    # the last, host work in between (evals, checkpoints, resizes) included.
    marks = {}

    def flush(s, aux):
      """Fetch a step's aux, check it, log it."""
      aux = jax.device_get(aux)
      marks["last"] = (s, time.time())
      marks.setdefault("first", marks["last"])
      meter.mark(*marks["last"])
      ok = np.atleast_2d(np.asarray(aux.pop("finite")))
      if not ok.all():
        bad_seeds = [runs[i].config.seed for i in np.flatnonzero(~ok.all(1))]
        bad = [paths[i] for i in np.flatnonzero(~ok.all(0)[:len(paths)])] or ["loss"]
        d = dirs[0]
        raise DivergedError(
            f"non-finite loss or parameters at step {s} (layer "
            f"{', '.join(bad[:3])}" + (f"; seed {bad_seeds}" if vmapped else "")
            + "); last good checkpoint: "
            + (f"step {d.last_good} in {d.ckpts.directory}"
               if d.last_good is not None else "none saved yet"))
      progress.update(s, float(np.mean(aux["loss"])))
      blowup(s, float(np.max(aux["loss"])))   # the worst seed
      if not periodic(s, t.log_every, total):
        return
      for i, d in enumerate(dirs):
        a = dict(lane(aux, i))
        row = {"train/loss": a.pop("loss"), "train/accuracy": a.pop("accuracy", 0.0)}
        for k, v in a.items():
          row[k if k.startswith("rank/") else f"train/{k}"] = v
        if meter.value is not None:     # none before two marks
          row["time/steps_per_sec"] = meter.value
        d.writer.write(s, row)

    pending = None         # (step, aux on device) of the previous step
    while step < total:
      host = [next(it) for it in iters]
      if vmapped:
        batch = sharder.batch({k: np.stack([b[k] for b in host]) for k in host[0]},
                              seed_axis=True)
      else:
        batch = sharder.batch(host[0])
      params, opt_state, aux = step_fn(params, opt_state, batch)
      step += 1
      if pending is not None:
        flush(*pending)       # the previous step, while this one runs
      pending = (step, aux)
      if not vmapped:         # fixed shapes under vmap: nothing to move
        params, opt_state, changed = integ.resize(params, opt_state)
        if changed:         # new shapes: placed by the same rules
          params, opt_state = sharder.place(params, opt_state)
          meter.restart()     # the next step recompiles
      if any(h.due(step, total) for h in dirs[0].hooks):
        flush(*pending)
        pending = None
        for i, d in enumerate(dirs):
          out = d.run_hooks(step, lane(params, i), lane(opt_state, i))
          if i == 0:
            progress.observe(out)
        meter.restart()       # hook time is no step time
    if pending is not None:
      flush(*pending)

    rates = {"time/steps_per_sec": (step - step0) / max(time.time() - t_loop, 1e-9),
             "time/steady_steps_per_sec": None, "time/train_loop_s": None,
             "step_compilations": _cache_size(step_fn)}
    if "first" in marks and marks["last"][0] > marks["first"][0]:
      (s0, t0), (s1, t1) = marks["first"], marks["last"]
      rates["time/steady_steps_per_sec"] = (s1 - s0) / max(t1 - t0, 1e-9)
      rates["time/train_loop_s"] = t1 - t0
    summaries = [finish_run(d, eval_fn, lane(params, i), sharder, steps=step,
                            t_start=t_start, rates=rates)
                 for i, d in enumerate(dirs)]
  except KeyboardInterrupt:
    if not dirs:
      raise
    last = [d.last_good for d in dirs]
    raise Interrupted(step, None if None in last else min(last)) from None
  finally:
    if progress is not None:
      progress.close()
    for d in dirs:
      d.close()
  logging.info("done: %s", json.dumps(summaries[0]["ranks"]))
  return summaries[0] if single else summaries


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """`train(build_run(config), workdir)`: the workdir contract (README,
  "Quickstart": config.json, metrics.jsonl, summary.json, checkpoints/,
  plots/); an existing run of the same config resumes.

  Raises:
    ConfigError, DatasetError, ValueError: bad config (before the workdir
      is touched). WorkdirError: workdir of another config.
    CheckpointError: corrupt checkpoint. DivergedError: NaN/Inf.
  """
  workdir_lib.check(workdir)        # in a second, before the data and model
  return train(build_run(config), workdir)


def fixed_shape(config: ml_collections.ConfigDict) -> bool:
  """The config's integrator keeps parameter shapes fixed (its seeds can be
  vmapped); asks the integrator, building nothing else."""
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  return integrators.build(config.integrator.name, optax.identity(),
                           **integrator_kwargs(config)).fixed_shape


def train_seeds_vmapped(configs, workdirs) -> list[dict]:
  """Configs that differ only in `seed` trained as one vmapped program
  (`train` with one run per seed).

  Raises:
    ConfigError: configs that differ in more than the seed, or a method
      whose shapes change.
  """
  return train([build_run(c) for c in configs], workdirs)
