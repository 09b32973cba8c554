"""Every integrator on LeNet5 and an MLP, Fashion-MNIST, through one step.

A short run per (model, method): end-to-end training through the common
step contract, with test accuracy, parameter counts, final ranks and
end-to-end steps/s in each summary.json; `sweep summarize` puts them in
one table (steps/s relative to dense are read off the same sweep).

  python -m lrtrain.sweep --config configs/methods_fashion.py --workdir runs/methods --all
  python -m lrtrain.sweep summarize --workdir runs/methods
  python -m lrtrain.main --config configs/methods_fashion.py:model=mlp,method=geolora --workdir runs/m

Methods and the kernels they train:
  dense, galore   dense kernels (GaLore: optax.contrib.scale_by_galore)
  kls             rank-adaptive DLRT (tau 0.1) on U S V^T
  kls_fixed       fixed-rank KLS
  factors         plain optax on U, S, V (the "vanilla" baseline); diverges
                  at lr 0.02, so also at lr 0.002 (factors_lr002)
  geolora         single-pass rank-adaptive (tau 0.1)
  tdlrt           Tucker convolutions (LeNet5), U S V^T dense layers
  condlr          orthonormal factors, approx_orth core (kappa <= 1.1)
  lora            frozen random W0 + B A (plain optax on A, B)
"""

from lrtrain import config_utils as cu

METHODS = ("dense", "kls", "kls_fixed", "factors", "factors_lr002", "geolora",
           "tdlrt", "condlr", "lora", "galore")
# Plain optax on U, S, V diverges at the common lr 0.02 (momentum 0.9) on
# both models within 15 steps; 'factors_lr002' is the same at lr 0.002.
_LR = {"factors_lr002": 0.002}

# method -> (integrator.name, adaptive, factor kind, conv kind)
_SETUP = {
    "dense": ("dense", False, "dense", "dense"),
    "galore": ("galore", False, "dense", "dense"),
    "kls": ("kls", True, "lowrank", "lowrank"),
    "kls_fixed": ("kls", False, "lowrank", "lowrank"),
    "factors": ("factors", False, "lowrank", "lowrank"),
    "factors_lr002": ("factors", False, "lowrank", "lowrank"),
    "geolora": ("geolora", True, "lowrank", "lowrank"),
    "tdlrt": ("tdlrt", True, "lowrank", "tucker"),
    "condlr": ("condlr", False, "lowrank", "lowrank"),
    "lora": ("lora", False, "lora", "lora"),
}


def get_config(arg=None):
  """arg: model (lenet5|mlp), method (see METHODS), rank, steps, seed, runlocal."""
  a = cu.parse_arg(arg, runlocal=False, model="lenet5", method="kls", rank=20,
                   steps=300, seed=0)
  if a.method not in _SETUP:
    raise ValueError(f"methods_fashion: method must be one of {METHODS}, "
                     f"got {a.method!r}")
  if a.model not in ("lenet5", "mlp"):
    raise ValueError(f"methods_fashion: model must be lenet5 or mlp, got {a.model!r}")
  name, adaptive, kind, conv_kind = _SETUP[a.method]
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "fashion_mnist"
  c.data.validation_size = 1000     # examples
  c.data.max_train = 20000          # examples (short runs)

  c.model.name = a.model
  c.model.widths = (512, 512)       # MLP hidden units (784 -> 512 -> 512 -> 10)
  c.model.factor.kind = kind
  c.model.factor.conv_kind = conv_kind
  c.model.factor.rank = a.rank      # LowRank / Lora rank requested ...
  c.model.factor.clip_rank = True   # ... capped at min(n, m) // 2 per layer
  c.model.factor.tucker_ranks = (10, 10)  # capped at half the channels

  c.integrator.name = name
  c.integrator.adaptive = adaptive
  c.integrator.tau = 0.1            # relative truncation tolerance
  c.integrator.variant = "approx_orth"
  c.integrator.kappa_tau = 0.1      # condlr: kappa(S) <= 1.1
  c.integrator.galore_rank = a.rank

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = _LR.get(a.method, 0.02)  # constant
  c.optimizer.momentum = 0.9

  c.train.batch_size = 64           # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps")
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = 0      # end only
  c.diagnostics.enabled = False     # timing of the training loop itself

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.widths = (32,)
    c.model.factor.rank = 4
    c.model.factor.tucker_ranks = (4, 4)
    c.integrator.galore_rank = 4
  return c


def get_sweep(arg=None):
  """Model x method (20 short runs)."""
  del arg
  return cu.product(cu.sweep("model.name", ["lenet5", "mlp"]),
                    _method_points())


def _method_points():
  pts = []
  for m in METHODS:
    name, adaptive, kind, conv_kind = _SETUP[m]
    pt = {"integrator.name": name, "integrator.adaptive": adaptive,
          "model.factor.kind": kind, "model.factor.conv_kind": conv_kind}
    if m in _LR:
      pt["optimizer.learning_rate"] = _LR[m]
    pts.append(pt)
  return pts
