"""`train_and_evaluate(config, workdir)`: one training run and its workdir.

Order of a run (nothing touches the workdir before step 3):

  1. validate the config (config_utils.validate), load the data, build the
     model and its initial params (rank limits are checked here);
  2. build the optimizer (optim.build) and the integrator by name;
  3. refuse a workdir holding a run of another config (unless
     config.overwrite), restore the latest checkpoint if any (a corrupt one
     raises), write config.json;
  4. loop: host batch -> device (batch axis sharded over all devices) ->
     jitted integrator step (buffers donated) -> host-side `resize`
     (capacity buckets) -> metrics of the previous step fetched after the
     next step is dispatched -> NaN/Inf guard -> eval / diagnostics /
     checkpoints on their own cadences;
  5. test evaluation, summary.json, plots/.

Axis legend: b = batch, T = sequence length, k = classes (or vocab).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrtrain import checkpoint as ckpt_lib
from lrtrain import config_utils
from lrtrain import factorizations as fz
from lrtrain import optim
from lrtrain import writers as writers_lib
from lrtrain.integrators import base as ibase

# Fields that change what a run computes; a workdir holding a run whose
# fingerprint differs is refused (num_steps may grow: that is a resume).
FINGERPRINT_SECTIONS = ("seed", "data", "model", "integrator", "optimizer")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
             "plots", "tensorboard")


class WorkdirError(RuntimeError):
  """The workdir holds a run of a different config."""


class DivergedError(FloatingPointError):
  """Loss or parameters became NaN/Inf."""


# --------------------------------------------------------------------------
# Setup helpers.
# --------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when a multi-host environment is set."""
  env = os.environ
  if any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")) \
      or ("SLURM_NTASKS" in env and int(env.get("SLURM_NTASKS", "1")) > 1):
    jax.distributed.initialize()


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """JSON of the config sections that determine the trajectory."""
  d = config.to_dict()
  fp = {k: d[k] for k in FINGERPRINT_SECTIONS}
  fp["batch_size"] = d["train"]["batch_size"]
  return json.dumps(fp, sort_keys=True, default=str)


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
  """Data parallel placement: batch axis over all devices, rest replicated."""

  def __init__(self):
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.data = NamedSharding(self.mesh, P("data"))
    self.repl = NamedSharding(self.mesh, P())
    self.n = jax.device_count()

  def replicate(self, tree):
    return jax.device_put(tree, self.repl)

  def batch(self, batch: dict[str, np.ndarray]):
    """A global host batch -> a sharded global array (this process's rows)."""
    pid, nproc = jax.process_index(), jax.process_count()

    def put(a):
      a = np.asarray(a)
      rows = a.shape[0] // nproc
      local = a[pid * rows:(pid + 1) * rows]
      return jax.make_array_from_process_local_data(self.data, local, a.shape)
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
  return out


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


def build_run(config: ml_collections.ConfigDict):
  """Everything of a run that does not touch the workdir.

  Returns:
    A dict with ds, model, init_params (capacity = rank), loss_fn,
    integrator, tx, total (steps).

  Raises:
    ConfigError, lrtrain.data.DatasetError, ValueError (rank too large).
  """
  from lrtrain import data as data_lib  # pylint: disable=g-import-not-at-top
  from lrtrain import integrators  # pylint: disable=g-import-not-at-top
  from lrtrain import models  # pylint: disable=g-import-not-at-top
  config_utils.validate(config)
  ds = data_lib.load(config.data)
  model = models.build(config.model, num_classes=ds.num_classes,
                       input_shape=tuple(ds.input_shape))
  key = jax.random.key(config.seed)
  x0 = np.zeros((1, *ds.input_shape),
                np.int32 if ds.task == "lm" else np.float32)
  params = jax.jit(lambda k: model.init(k, x0, train=False)["params"])(key)
  total = num_steps(config, ds)
  tx = optim.build(config.optimizer, total)
  integ = integrators.build(config.integrator.name, tx,
                            **integrator_kwargs(config))
  return dict(ds=ds, model=model, init_params=params, total=total, tx=tx,
              integrator=integ, loss_fn=make_loss_fn(model, ds.task))


def prepare_workdir(config, workdir: str) -> None:
  """Refuse a workdir of another config; clear it under config.overwrite.

  Raises:
    WorkdirError: a config.json with another fingerprint and no overwrite.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = ml_collections.ConfigDict(json.load(fh))
      same = fingerprint(old) == fingerprint(config)
    except (json.JSONDecodeError, KeyError, TypeError):
      same = False
    if not same:
      if not config.overwrite:
        raise WorkdirError(f"workdir {workdir} holds a run of a different "
                           "config; use another workdir or set "
                           "--config.overwrite=True to replace it")
      logging.warning("overwriting the run in %s", workdir)
      for name in RUN_FILES:
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.remove(p)
  os.makedirs(workdir, exist_ok=True)


def _cache_size(jitted) -> int | None:
  """Compiled variants of a jitted function (one per input shape set: each
  capacity-bucket change of a rank-adaptive run adds one); None if this jax
  does not expose the count."""
  size = getattr(jitted, "_cache_size", None)
  return int(size()) if callable(size) else None


def finish_run(config, workdir: str, ds, eval_fn, params, sharder: Sharder, *,
               steps: int, t_start: float, steps_per_sec: float,
               steady_steps_per_sec: float | None = None,
               step_compilations: int | None = None) -> dict:
  """Test evaluation, summary.json and plots/ of a finished run."""
  t = config.train
  test = evaluate(eval_fn, params, ds, "test", t.eval_batch_size, sharder)
  counts = param_counts(params)
  summary = {
      "steps": int(steps),
      "test/accuracy": test.get("accuracy"),
      "test/loss": test.get("loss"),
      "params/train": counts["train"],
      "params/eval": counts["eval"],
      "params/dense": counts["dense"],
      "params/compression": counts["compression"],
      "ranks": host_ranks(params),
      "time/wall_s": time.time() - t_start,
      "time/steps_per_sec": steps_per_sec,
      "time/steady_steps_per_sec": steady_steps_per_sec,
      "step_compilations": step_compilations,
      "integrator": config.integrator.name,
      "devices": jax.device_count(),
  }
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as fh:
    fh.write(json.dumps({"step": int(steps), **{
        f"test/{k}": float(v) for k, v in test.items()}}) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as fh:
    json.dump(writers_lib.to_json_value_tree(summary), fh, indent=2)
  try:
    from lrtrain.diagnostics import plots  # pylint: disable=g-import-not-at-top
    plots.render(os.path.join(workdir, "metrics.jsonl"),
                 os.path.join(workdir, "plots"))
  except Exception as e:  # plots never fail a finished run
    logging.warning("plots failed: %s", e)
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Train, evaluate and write the workdir contract (README, "Quickstart":
  config.json, metrics.jsonl, summary.json, checkpoints/, plots/).

  Args:
    config: a resolved config (configs/*.py get_config).
    workdir: run directory; an existing run of the same config resumes.

  Returns:
    The summary dict (also written to summary.json).

  Raises:
    ConfigError, DatasetError, ValueError: bad config (before the workdir
      is touched). WorkdirError: workdir of another config.
    CheckpointError: corrupt checkpoint. DivergedError: NaN/Inf.
  """
  t_start = time.time()
  run = build_run(config)
  ds, integ, loss_fn, total = (run["ds"], run["integrator"], run["loss_fn"],
                               run["total"])
  sharder = Sharder()
  prepare_workdir(config, workdir)
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                               config.train.max_to_keep)
  fp = fingerprint(config)

  # Resume order: latest step -> params (saved shapes) -> optimizer-state
  # structure from those params -> its leaves -> data position = step -> RNG.
  rng = jax.random.key_data(jax.random.key(config.seed))
  step = ckpts.latest_step()
  if step is not None:
    meta, leaves = ckpts.restore_leaves(step)
    g = meta["groups"]
    params = ckpt_lib.rebuild(run["init_params"], leaves["params"],
                              g["params"]["paths"], "params")
    params = jax.tree.map(jnp.asarray, params)
    like = jax.eval_shape(integ.init, params)
    opt_state = ckpt_lib.rebuild(like, leaves["opt_state"],
                                 g["opt_state"]["paths"], "optimizer state")
    rng = leaves["rng"][0]
    logging.info("resumed from step %d in %s", step, ckpts.directory)
  else:
    step = 0
    params = run["init_params"]
    opt_state = integ.init(params)
    params, opt_state, _ = integ.resize(params, opt_state)  # first bucketing
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json(indent=2))
  writers_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), step)

  params, opt_state = sharder.replicate(params), sharder.replicate(opt_state)
  writer = writers_lib.MultiWriter(workdir, tensorboard=config.logging.tensorboard)
  diag = None
  if config.diagnostics.enabled and config.diagnostics.every > 0:
    from lrtrain import diagnostics  # pylint: disable=g-import-not-at-top
    d = config.diagnostics
    diag = diagnostics.Diagnostics(run["init_params"], top_k=d.top_k, eps=d.eps,
                                   full_spectrum=d.full_spectrum,
                                   heavy_tail=d.heavy_tail)
  eval_fn = make_eval_fn(run["model"], ds.task)
  paths = _float_paths(params)

  def train_step(params, state, batch):
    new, state, aux = integ.step(loss_fn, params, state, batch)
    aux = dict(aux)
    aux["param_norm"] = optax.tree.norm(ibase.trainable(new))
    lr = optim.learning_rate(state)
    if lr is not None:
      aux["learning_rate"] = lr
    aux["finite"] = _finite_flags(new) & jnp.isfinite(aux["loss"])
    return new, state, aux

  step_fn = jax.jit(train_step, donate_argnums=(0, 1))
  batches: Iterator = ds.batches("train", config.train.batch_size,
                                 seed=config.seed, start_step=step)
  progress = writers_lib.Progress(total, step, enabled=config.logging.progress,
                                  every=max(config.train.log_every, 1))
  t = config.train
  last_good = step       # the latest finite checkpoint (never overwritten)
  pending = None         # (step, aux on device) of the previous step
  t_loop, step0 = time.time(), step
  # Steady rate: from the end of the first (compiling) step to the end of the
  # last, host work in between (evals, checkpoints, resizes) included.
  marks = {}

  def every(n, s):
    return n > 0 and s % n == 0

  def flush(p):
    """Fetch a step's aux, check it, log it; returns the host dict."""
    s, aux = p
    aux = jax.device_get(aux)
    marks["last"] = (s, time.time())
    marks.setdefault("first", marks["last"])
    ok = np.asarray(aux.pop("finite"))
    if not ok.all():
      bad = [paths[i] for i in np.flatnonzero(~ok[:len(paths)])] or ["loss"]
      raise DivergedError(
          f"non-finite loss or parameters at step {s} (layer "
          f"{', '.join(bad[:3])}); last good checkpoint: "
          + (f"step {last_good} in {ckpts.directory}" if ckpts.latest_step()
             is not None else "none saved yet"))
    progress.update(s, float(aux["loss"]))
    if every(t.log_every, s) or s == total:
      row = {"train/loss": aux.pop("loss"), "train/accuracy": aux.pop("accuracy", 0.0)}
      for k, v in aux.items():
        row[k if k.startswith("rank/") else f"train/{k}"] = v
      row["time/steps_per_sec"] = (s - step0) / max(time.time() - t_loop, 1e-9)
      writer.write(s, row)
    return aux

  try:
    while step < total:
      batch = sharder.batch(next(batches))
      params, opt_state, aux = step_fn(params, opt_state, batch)
      step += 1
      if pending is not None:
        flush(pending)       # previous step, while this one runs
      pending = (step, aux)
      params, opt_state, changed = integ.resize(params, opt_state)
      if changed:
        params, opt_state = sharder.replicate(params), sharder.replicate(opt_state)
      need_sync = (every(t.eval_every, step) or every(t.checkpoint_every, step)
                   or (diag is not None and every(config.diagnostics.every, step))
                   or step == total)
      if need_sync:
        flush(pending)
        pending = None
      if every(t.eval_every, step) or step == total:
        ev = evaluate(eval_fn, params, ds, "validation", t.eval_batch_size, sharder)
        if ev:
          writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
      if diag is not None and (every(config.diagnostics.every, step)
                               or step == total):
        writer.write(step, diag(params))
      if every(t.checkpoint_every, step) or step == total:
        ckpts.save(step, params=params, opt_state=opt_state, rng=rng,
                   fingerprint=fp)
        last_good = step
    if pending is not None:
      flush(pending)
  finally:
    progress.close()
    writer.close()

  steady = None
  if "first" in marks and marks["last"][0] > marks["first"][0]:
    (s0, t0), (s1, t1) = marks["first"], marks["last"]
    steady = (s1 - s0) / max(t1 - t0, 1e-9)
  summary = finish_run(config, workdir, ds, eval_fn, params, sharder,
                       steps=step, t_start=t_start,
                       steps_per_sec=(step - step0) / max(time.time() - t_loop, 1e-9),
                       steady_steps_per_sec=steady,
                       step_compilations=_cache_size(step_fn))
  ckpts.close()
  logging.info("done: %s", json.dumps(summary["ranks"]))
  return summary


# --------------------------------------------------------------------------
# Several seeds of one configuration in one compiled program.
# --------------------------------------------------------------------------

FIXED_SHAPE = ("dense", "factors", "lora")


def vmappable(config) -> bool:
  """Methods whose parameter shapes never change (no capacity buckets)."""
  return (config.integrator.name in FIXED_SHAPE
          or (config.integrator.name in ("kls", "geolora", "condlr")
              and not config.integrator.adaptive))


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _slice(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def train_seeds_vmapped(configs, workdirs) -> list[dict]:
  """Train configs that differ only in `seed` as one vmapped program.

  The step is vmapped over a leading seed axis of params, optimizer state
  and batch (each seed keeps its own init and data order); every seed
  writes its own workdir (config.json, metrics.jsonl, summary.json, a
  final checkpoint, plots/).

  Args:
    configs: configs of a fixed-shape method (`vmappable`), equal but seed.
    workdirs: one run directory per config.

  Returns:
    The summaries.

  Raises:
    ConfigError: configs that differ in more than the seed, or a method
      whose shapes change.
  """
  t_start = time.time()
  fps = {json.dumps({**json.loads(fingerprint(c)), "seed": 0}) for c in configs}
  if len(fps) != 1 or not all(vmappable(c) for c in configs):
    raise config_utils.ConfigError("vmapped seeds need configs of a fixed-shape "
                                   "method that differ only in seed")
  runs = [build_run(c) for c in configs]
  for c, w in zip(configs, workdirs):
    prepare_workdir(c, w)
    with open(os.path.join(w, "config.json"), "w") as fh:
      fh.write(c.to_json(indent=2))
  run0, c0 = runs[0], configs[0]
  ds, integ, loss_fn, total = run0["ds"], run0["integrator"], run0["loss_fn"], run0["total"]
  sharder = Sharder()
  params = sharder.replicate(_stack([r["init_params"] for r in runs]))
  opt_state = jax.jit(jax.vmap(integ.init))(params)
  seed_batch = NamedSharding(sharder.mesh, P(None, "data"))

  def one(p, s, b):
    new, s, aux = integ.step(loss_fn, p, s, b)
    aux = dict(aux)
    aux["finite"] = jnp.all(_finite_flags(new)) & jnp.isfinite(aux["loss"])
    return new, s, aux
  step_fn = jax.jit(jax.vmap(one), donate_argnums=(0, 1))
  iters = [ds.batches("train", c.train.batch_size, seed=c.seed, start_step=0)
           for c in configs]
  writers = [writers_lib.MultiWriter(w, tensorboard=c.logging.tensorboard)
             for c, w in zip(configs, workdirs)]
  diags = [None] * len(configs)
  if c0.diagnostics.enabled and c0.diagnostics.every > 0:
    from lrtrain import diagnostics  # pylint: disable=g-import-not-at-top
    d = c0.diagnostics
    diags = [diagnostics.Diagnostics(r["init_params"], top_k=d.top_k, eps=d.eps,
                                     full_spectrum=d.full_spectrum,
                                     heavy_tail=d.heavy_tail) for r in runs]
  eval_fn = make_eval_fn(run0["model"], ds.task)
  t, t_loop = c0.train, time.time()
  try:
    for step in range(1, total + 1):
      host = [next(it) for it in iters]
      batch = {k: jax.device_put(np.stack([b[k] for b in host]), seed_batch)
               for k in host[0]}
      params, opt_state, aux = step_fn(params, opt_state, batch)
      log = (t.log_every > 0 and step % t.log_every == 0) or step == total
      if not (log or step % 50 == 0):
        continue
      aux = jax.device_get(aux)
      if not np.all(aux.pop("finite")):
        raise DivergedError(f"non-finite loss or parameters at step {step} "
                            "(vmapped seeds)")
      rate = step / max(time.time() - t_loop, 1e-9)
      for i, w in enumerate(writers):
        if log:
          row = {"train/loss": aux["loss"][i],
                 "train/accuracy": aux.get("accuracy", np.zeros(len(writers)))[i],
                 "time/steps_per_sec": rate}
          row.update({k: v[i] for k, v in aux.items() if k.startswith("rank/")})
          w.write(step, row)
        p_i = _slice(params, i)
        if (t.eval_every > 0 and step % t.eval_every == 0) or step == total:
          ev = evaluate(eval_fn, p_i, ds, "validation", t.eval_batch_size, sharder)
          if ev:
            w.write(step, {f"eval/{k}": v for k, v in ev.items()})
        if diags[i] is not None and (step % c0.diagnostics.every == 0
                                     or step == total):
          w.write(step, diags[i](p_i))
  finally:
    for w in writers:
      w.close()
  rate = total / max(time.time() - t_loop, 1e-9)
  summaries = []
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    p_i, s_i = _slice(params, i), _slice(opt_state, i)
    ck = ckpt_lib.Checkpoints(os.path.join(w, "checkpoints"), c.train.max_to_keep)
    ck.save(total, params=p_i, opt_state=s_i,
            rng=jax.random.key_data(jax.random.key(c.seed)), fingerprint=fingerprint(c))
    ck.close()
    summaries.append(finish_run(c, w, ds, eval_fn, p_i, sharder, steps=total,
                                t_start=t_start, steps_per_sec=rate))
  return summaries
