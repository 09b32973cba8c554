"""TDLRT: rank-adaptive Tucker convolutions vs matrix (DLRT) factorization
of the same convolutions, small VGG on Fashion-MNIST.

  python -m experiments.tdlrt_tucker.run
  # = python -m lrtrain.sweep --config experiments/tdlrt_tucker/config.py \
  #       --all --workdir runs/tdlrt_tucker  + the report step

conv2..conv5 are factorized (conv1, fc1 and the head stay dense in every
run, so the two families differ only in how the same four convolutions are
factorized): Tucker (integrator 'tdlrt', channel modes adaptive, 3x3
spatial modes full) over tau, and U S V^T of the (c_out, 9 c_in) matrix
(integrator 'kls', rank-adaptive DLRT) over tau; compared on the
accuracy-vs-compression plane of the factorized convolutions, plus one
dense run. Scale (2-core shared CPU, heavily shared while this ran):
6k training examples, batch 32, 100 steps (~0.5 epoch). `dataset=mnist` / `dataset=cifar10` run the same
sweep on the paper-like datasets on a connected machine.

References:
  Zangrando, Schotthoefer, Ceruti, Kusch, Tudisco, "Geometry-aware training
  of factorized layers in tensor Tucker format", NeurIPS 2024.
"""

from lrtrain import config_utils as cu

TUCKER_TAUS = (0.2, 0.45)
MATRIX_TAUS = (0.2, 0.45)


def get_config(arg=None):
  """arg: runlocal, dataset, tau, seed, steps, family (tucker|matrix|dense)."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist", tau=0.15,
                   seed=0, steps=100, family="tucker")
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = a.dataset
  c.data.max_train = 6000           # examples (subset for the CPU budget)
  c.data.validation_size = 1000     # examples

  c.model.name = "vgg"
  c.model.factor.kind = "dense"     # fc1 stays dense
  c.model.factor.conv_kind = "tucker"
  c.model.factor.rank = 16          # matrix runs: initial rank of each conv
  c.model.factor.tucker_ranks = (16, 16)  # (r_out, r_in) initial channel ranks
  c.model.dense_layers = ("head", "conv1", "fc1")

  c.integrator.name = "tdlrt"
  c.integrator.tau = a.tau          # relative truncation tolerance per mode
  c.integrator.adaptive = True
  c.integrator.r_min = 2            # smallest rank per mode

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05  # peak
  c.optimizer.momentum = 0.9
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 10     # steps

  c.train.batch_size = 32           # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 50           # steps
  c.train.log_every = 10            # steps
  c.train.checkpoint_every = 50     # steps
  c.diagnostics.every = 50          # steps
  c.diagnostics.heavy_tail = False
  c.logging.progress = False
  _family(c, a.family)

  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.model.factor.rank = 4
    c.model.factor.tucker_ranks = (4, 4)
    c.optimizer.warmup_steps = 1
    c.diagnostics.enabled = False
  return c


def _family(c, family: str) -> None:
  """Set conv kind and integrator of a family (tucker|matrix|dense)."""
  if family == "tucker":
    c.model.factor.conv_kind, c.integrator.name = "tucker", "tdlrt"
  elif family == "matrix":
    c.model.factor.conv_kind, c.integrator.name = "lowrank", "kls"
  elif family == "dense":
    c.model.factor.conv_kind, c.integrator.name = "dense", "dense"
  else:
    raise cu.ConfigError(f"family={family!r}: expected tucker|matrix|dense")


def get_sweep(arg=None):
  """Tucker over tau, matrix over tau, one dense run."""
  runlocal = "runlocal" in (arg or "")
  tt = TUCKER_TAUS[:1] if runlocal else TUCKER_TAUS
  mt = MATRIX_TAUS[:1] if runlocal else MATRIX_TAUS
  tucker = cu.product(cu.sweep("model.factor.conv_kind", ["tucker"]),
                      cu.sweep("integrator.name", ["tdlrt"]),
                      cu.sweep("integrator.tau", tt))
  matrix = cu.product(cu.sweep("model.factor.conv_kind", ["lowrank"]),
                      cu.sweep("integrator.name", ["kls"]),
                      cu.sweep("integrator.tau", mt))
  dense = [{"model.factor.conv_kind": "dense", "integrator.name": "dense"}]
  if runlocal:
    return tucker
  return cu.chain(tucker, matrix, dense)
