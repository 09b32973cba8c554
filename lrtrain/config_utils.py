"""Config helpers: typed argument strings, the shared base config, sweeps and
up-front validation.

A config file is a Python module with `get_config(arg=None)` and
`get_sweep(arg=None)`. `arg` is the string after the file name
(`configs/dlrt_lenet5.py:tau=0.1,runlocal`) and is parsed by `parse_arg`
into typed fields. A sweep is a list of override dicts built from

  sweep("integrator.tau", [0.05, 0.1])         -> [{tau: .05}, {tau: .1}]
  product(a, b)                                -> every pair, merged
  zip_(a, b)                                   -> pairwise, merged
  chain(a, b)                                  -> a then b

`apply_overrides(config, point)` builds one sweep point under the lock (an
unknown key or a wrong type raises), and `validate(config)` checks a
resolved config in one place before anything touches a workdir.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterable, Sequence

import ml_collections

Override = dict[str, Any]


# train.blowup: what a finite loss blow-up does (train.BlowupGuard).
BLOWUP_MODES = ("warn", "error", "off")


class ConfigError(ValueError):
  """A config that cannot run: the message names the field and the problem."""


def load_failure(path: str, e: BaseException) -> str:
  """One line for a config file that failed to import or whose get_config /
  get_sweep raised something other than a ConfigError (main and sweep)."""
  if isinstance(e, SyntaxError):
    return (f"config file {e.filename or path} line {e.lineno}: {e.msg}; fix "
            "the file (--debug shows the traceback)")
  text = " ".join(str(e).split())
  return (f"config file {path} failed to load: {type(e).__name__}: {text} "
          "(--debug shows the traceback)")


# --------------------------------------------------------------------------
# Argument strings.
# --------------------------------------------------------------------------


def _cast(key: str, text: str, default: Any) -> Any:
  """`text` as the type of `default` (bool, int, float, str, tuple)."""
  if isinstance(default, bool):
    low = text.lower()
    if low in ("", "1", "true", "yes", "on"):
      return True
    if low in ("0", "false", "no", "off"):
      return False
    raise ConfigError(f"config argument {key}: expected a bool, got {text!r}")
  try:
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ConfigError(f"config argument {key}: expected "
                      f"{type(default).__name__}, got {text!r}") from None
  if isinstance(default, tuple):
    items = [t for t in text.replace("+", " ").split() if t]
    inner = default[0] if default else ""
    return tuple(_cast(key, t, inner) for t in items)
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parse 'k1=v1,k2,k3=v3' into typed fields (big_vision style).

  Types follow the defaults; a bare key sets a bool to True; tuples are
  written with '+' between items ('widths=64+32').

  Args:
    arg: the argument string (None or '' gives the defaults).
    **defaults: every accepted key with its default value.

  Returns:
    A locked ConfigDict of the parsed values.

  Raises:
    ConfigError: an unknown key or a value of the wrong type.
  """
  out = dict(defaults)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, sep, text = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; accepted: "
                        f"{', '.join(sorted(defaults))}")
    if not sep and not isinstance(defaults[key], bool):
      raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
    out[key] = _cast(key, text.strip(), defaults[key])
  cfg = ml_collections.ConfigDict(out)
  cfg.lock()
  return cfg


# --------------------------------------------------------------------------
# The shared base config.
# --------------------------------------------------------------------------


def base_config() -> ml_collections.ConfigDict:
  """Every knob of a run, with defaults (unlocked; config files edit it).

  Returns:
    A ConfigDict with sections data, model, integrator, optimizer, train,
    diagnostics, mesh, logging and the top-level seed / runlocal / overwrite.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0                        # PRNG seed of init and data order
  c.runlocal = False                # shrink everything to a CPU smoke run
  c.overwrite = False               # allow reusing a workdir of another config

  # --- Data (lrtrain.data.load) ---
  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"            # digits|fashion_mnist|mnist|cifar10|mnist1d|...
  c.data.dir = ""                   # '' = default location
  c.data.cache_dir = ""             # download cache ('' = default)
  c.data.download = False           # fetch missing files
  c.data.validation_size = 200      # examples held out of train
  c.data.max_train = 0              # 0 = all training examples
  c.data.classes = ()               # () = all classes
  c.data.seed = 0                   # seed of the validation split
  c.data.text_file = ""             # text corpus for 'chars' / 'text' ('' = default)
  c.data.seq_len = 64               # chars, text, tokens: tokens per window
  c.data.token_file = ""            # tokens: flat binary file of token ids
  c.data.token_dtype = "uint16"     # tokens: uint16|uint32 (little-endian)
  c.data.vocab_size = 0             # tokens: vocabulary size (> every id)
  c.data.holdout_fraction = 0.02    # text, tokens: tail held out (validation, test)

  # --- Model (lrtrain.models.build) ---
  from lrtrain import models  # pylint: disable=g-import-not-at-top
  c.model = models.default_model_config()

  # --- Integrator (lrtrain.integrators.build) ---
  c.integrator = ml_collections.ConfigDict()
  c.integrator.name = "kls"         # dense|factors|lora|galore|kls|geolora|tdlrt|condlr|sltrain|relora
  c.integrator.tau = 0.1            # relative truncation tolerance, [0, 1)
  c.integrator.adaptive = True      # rank-adaptive (augment + truncate)
  c.integrator.r_min = 2            # smallest rank per layer
  c.integrator.r_max = 0            # largest rank per layer (0 = min(n, m) / 2)
  c.integrator.transport = True     # map optimizer moments across basis changes
  c.integrator.transport_rule = ""  # second moments: squares_fresh|squares|squares_mean|root; '' = the method's (kls: squares_fresh, geolora: squares)
  c.integrator.basis_period = 0     # geolora: c > 0 runs the basis step every c + 1 steps; 0 every step
  c.integrator.truncation_delay = 0  # geolora: d in 1..c truncates d steps after augmenting; 0 same step
  c.integrator.variant = "mean"     # condlr: mean|approx_orth
  c.integrator.kappa_tau = 0.0      # condlr: condition-number tolerance
  c.integrator.galore_rank = 32     # galore: projection rank
  c.integrator.update_proj_gap = 200  # galore: steps between projector refreshes
  c.integrator.relora_period = 200  # relora: steps between merges (adapters restart)
  c.integrator.relora_prune = 0.99  # relora: fraction of adapter moments zeroed at a merge (1 = reset)

  # --- Optimizer (lrtrain.optim.build) ---
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"          # sgd|momentum|adam|adamw
  c.optimizer.learning_rate = 0.05  # peak learning rate
  c.optimizer.momentum = 0.9        # momentum (momentum)
  c.optimizer.b1 = 0.9              # adam beta1
  c.optimizer.b2 = 0.999            # adam beta2
  c.optimizer.weight_decay = 0.0    # L2 (sgd/momentum/adam) or decoupled (adamw)
  c.optimizer.schedule = "constant"  # constant|cosine|warmup_cosine|jagged_cosine
  c.optimizer.warmup_steps = 0      # linear warmup (warmup_cosine, jagged_cosine), steps
  # jagged_cosine: steps between warm restarts; a reference to
  # integrator.relora_period (setting either sets both)
  c.optimizer.restart_period = c.integrator.get_ref("relora_period")
  c.optimizer.restart_warmup = 50   # jagged_cosine: ramp from 0 after a restart, steps
  c.optimizer.clip_norm = 0.0       # clip_by_global_norm (0 = off)

  # --- Training loop ---
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64           # global batch, examples
  c.train.num_steps = 1000          # optimizer steps (0: use num_epochs)
  c.train.num_epochs = 0            # epochs of the train split (if num_steps == 0)
  c.train.eval_every = 200          # steps between validation passes
  c.train.log_every = 50            # steps between metrics.jsonl rows
  c.train.checkpoint_every = 500    # steps between checkpoints (0 = end only)
  c.train.eval_batch_size = 256     # eval batch, examples
  c.train.max_to_keep = 2           # checkpoints kept
  c.train.restore_fallback = False  # corrupt checkpoint: resume from an earlier one
  c.train.blowup = "warn"           # finite loss blow-up: warn|error|off

  # --- Diagnostics (lrtrain.diagnostics.Diagnostics) ---
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.enabled = True      # spectral diagnostics on their own cadence
  c.diagnostics.every = 200         # steps between diagnostics
  c.diagnostics.top_k = 10          # logged top-k singular values / maxsim
  c.diagnostics.eps = 0.5           # intruder threshold on max |cos|
  c.diagnostics.full_spectrum = False  # also log all singular values
  c.diagnostics.heavy_tail = True   # power-law alpha fits
  c.diagnostics.gradients = True    # grad/<layer>/*: full-weight gradient stable rank
  c.diagnostics.updates = True      # update/<layer>/*: update norms, subspace overlap
  c.diagnostics.update_k = 8        # k of the update subspaces compared

  # --- Device mesh (lrtrain.sharding: axis sizes and placement rules) ---
  from lrtrain import sharding  # pylint: disable=g-import-not-at-top
  c.mesh = sharding.default_config()   # data=-1 (the rest), model=1

  # --- Logging ---
  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = False     # also write TensorBoard event files
  c.logging.progress = True         # progress bar on a terminal
  return c


def shrink_for_local(c: ml_collections.ConfigDict) -> None:
  """The runlocal variant: a few tiny steps on a small subset, on CPU."""
  c.runlocal = True
  c.data.max_train = min(c.data.max_train or 512, 512)
  c.data.validation_size = min(c.data.validation_size, 64)
  c.train.batch_size = 16
  c.train.eval_batch_size = 64
  c.train.num_steps = 3
  c.train.num_epochs = 0
  c.train.eval_every = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.diagnostics.every = 2
  c.logging.progress = False


# --------------------------------------------------------------------------
# Sweeps.
# --------------------------------------------------------------------------


def sweep(key: str, values: Iterable[Any]) -> list[Override]:
  """One override per value of `key` (a dotted config path)."""
  return [{key: v} for v in values]


def product(*sweeps: Sequence[Override]) -> list[Override]:
  """The cartesian product of sweeps, each point the merge of one of each."""
  return _merged(itertools.product(*sweeps))


def _merged(combos) -> list[Override]:
  """One override dict per combination (later keys win)."""
  return [{k: v for d in combo for k, v in d.items()} for combo in combos]


def zip_(*sweeps: Sequence[Override]) -> list[Override]:
  """Sweeps of equal length merged pointwise.

  Raises:
    ValueError: sweeps of different lengths.
  """
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zip_ of sweeps with different lengths {sorted(lengths)}")
  return _merged(zip(*sweeps))


def chain(*sweeps: Sequence[Override]) -> list[Override]:
  """The points of each sweep in turn."""
  return [dict(d) for s in sweeps for d in s]


def _format_value(v: Any) -> str:
  if isinstance(v, float):
    return repr(v) if math.isfinite(v) else str(v)
  if isinstance(v, (tuple, list)):
    return "+".join(_format_value(x) for x in v)
  return str(v)


def run_name(point: Override) -> str:
  """Directory name of a sweep point: 'tau=0.1,seed=0' (last key component,
  or the full dotted key where two swept keys share their last component)."""
  if not point:
    return "default"
  lasts = [k.rsplit(".", 1)[-1] for k in point]
  parts = []
  for key, last in zip(point, lasts):
    name = last if lasts.count(last) == 1 else key
    parts.append(f"{name}={_format_value(point[key])}")
  return ",".join(parts).replace("/", "_")


def apply_overrides(config: ml_collections.ConfigDict,
                    point: Override) -> ml_collections.ConfigDict:
  """A copy of `config` (locked) with dotted-key overrides applied.

  Derived fields (`get_ref`) follow the overrides.

  Raises:
    ConfigError: a key the config lacks, or a value of the wrong type.
  """
  c = copy.deepcopy(config)
  c.lock()
  for key, value in point.items():
    parts = key.split(".")
    node = c
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"override {key!r}: the config has no field "
                          f"{'.'.join(parts[:i + 1])!r}")
      if i < len(parts) - 1:
        node = node[part]
    try:
      if isinstance(value, list):
        value = tuple(value)
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"override {key}={value!r}: wrong type ({e})") from None
  return c


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------

def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def validate(config: ml_collections.ConfigDict) -> None:
  """Check a resolved config before anything is built or written.

  Checks names (dataset, model, integrator, optimizer, schedule, factor
  kinds), ranges (tau in [0, 1), positive sizes, learning rate), that
  config.mesh fits the devices and that the batch splits over its data
  axis. Rank limits per layer
  need the layer shapes and are checked when the model is built
  (`lrtrain.models.build` raises naming the layer).

  Raises:
    ConfigError: the first problem found, with the field's name.
  """
  # The name lists live next to their builders.
  from lrtrain import data, integrators, models, optim  # pylint: disable=g-import-not-at-top
  c = config
  names = (("dataset", "data.name", c.data.name, data.NAMES),
           ("model", "model.name", c.model.name, models.MODEL_NAMES),
           ("method", "integrator.name", c.integrator.name,
            sorted(integrators.METHODS)),
           ("optimizer", "optimizer.name", c.optimizer.name, optim.NAMES),
           ("schedule", "optimizer.schedule", c.optimizer.schedule,
            optim.SCHEDULES),
           ("kind", "model.factor.kind", c.model.factor.kind, models.DENSE_KINDS),
           ("kind", "model.factor.conv_kind", c.model.factor.conv_kind,
            models.CONV_KINDS))
  for what, field, value, valid in names:
    _check(value in valid, f"unknown {what} {field}={value!r}; valid: "
           f"{', '.join(valid)}")
  _check(c.data.name not in data.LM_NAMES or c.model.name in models.LM_MODELS,
         f"data.name={c.data.name!r} is a language-modelling task (token "
         f"sequences) and needs model.name="
         f"{' or '.join(repr(m) for m in models.LM_MODELS)}, not "
         f"model.name={c.model.name!r}")
  tau = c.integrator.tau
  _check(0.0 <= tau < 1.0, f"integrator.tau={tau} must be in [0, 1)")
  _check(c.model.factor.rank >= 1,
         f"model.factor.rank={c.model.factor.rank} must be >= 1")
  _check(c.integrator.r_min >= 1, f"integrator.r_min={c.integrator.r_min} must be >= 1")
  _check(c.integrator.r_max >= 0, f"integrator.r_max={c.integrator.r_max} must be >= 0")
  _check(c.optimizer.learning_rate > 0,
         f"optimizer.learning_rate={c.optimizer.learning_rate} must be > 0")
  _check(c.optimizer.weight_decay >= 0,
         f"optimizer.weight_decay={c.optimizer.weight_decay} must be >= 0")
  _check(c.optimizer.clip_norm >= 0,
         f"optimizer.clip_norm={c.optimizer.clip_norm} must be >= 0")
  _check(c.optimizer.warmup_steps >= 0,
         f"optimizer.warmup_steps={c.optimizer.warmup_steps} must be >= 0")
  try:
    integrators.check_config(c)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  o = c.optimizer
  _check(o.schedule != "jagged_cosine"
         or 0 <= o.restart_warmup < o.restart_period,
         f"optimizer.schedule='jagged_cosine' needs 0 <= "
         f"optimizer.restart_warmup < optimizer.restart_period (got "
         f"{o.restart_warmup} and {o.restart_period}): each restart's ramp "
         "must end before the next restart")
  _check(isinstance(c.seed, int) and c.seed >= 0,
         f"seed={c.seed} must be a non-negative integer")
  _check(c.data.max_train >= 0,
         f"data.max_train={c.data.max_train} must be >= 0 (0 = all examples)")
  t = c.train
  _check(t.batch_size >= 1, f"train.batch_size={t.batch_size} must be >= 1")
  _check(t.eval_batch_size >= 1,
         f"train.eval_batch_size={t.eval_batch_size} must be >= 1")
  _check(t.num_steps > 0 or t.num_epochs > 0,
         "train.num_steps or train.num_epochs must be > 0")
  _check(t.num_steps >= 0 and t.num_epochs >= 0,
         "train.num_steps and train.num_epochs must be >= 0")
  for key in ("eval_every", "log_every", "checkpoint_every"):
    _check(t[key] >= 0, f"train.{key}={t[key]} must be >= 0")
  _check(t.blowup in BLOWUP_MODES, f"unknown train.blowup={t.blowup!r}; "
         f"valid: {', '.join(BLOWUP_MODES)}")
  _check(c.diagnostics.every >= 0,
         f"diagnostics.every={c.diagnostics.every} must be >= 0")
  _check(c.diagnostics.top_k >= 1,
         f"diagnostics.top_k={c.diagnostics.top_k} must be >= 1")
  _check(c.diagnostics.update_k >= 1,
         f"diagnostics.update_k={c.diagnostics.update_k} must be >= 1")
  data = check_mesh(c)
  check_batch(t.batch_size, data)


def check_mesh(config: ml_collections.ConfigDict) -> int:
  """config.mesh fits the devices; returns the data axis size (the ways the
  batch is split). A config without a mesh section is data parallel.

  Raises:
    ConfigError: naming mesh.data / mesh.model.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lrtrain import sharding  # pylint: disable=g-import-not-at-top
  mesh = config.get("mesh") or sharding.default_config()
  try:
    return sharding.mesh_shape(mesh, jax.device_count())[0]
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_batch(batch_size: int, num_devices: int | None = None) -> None:
  """The global batch must split evenly over the data-parallel devices
  (the mesh's data axis).

  Raises:
    ConfigError: batch_size not divisible by the number of devices.
  """
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  if batch_size % num_devices:
    raise ConfigError(f"train.batch_size={batch_size} must be divisible by "
                      f"the number of devices ({num_devices}) on the data "
                      "axis (mesh.data)")
