"""DLRT rank dynamics on the 5-layer 784-wide MLP (Schotthoefer et al. 2022).

784 -> 784 x 4 (U S V^T, rank-adaptive KLS) -> 10 (dense head); Adam 1e-3
as in the paper; every layer starts where the authors' rank-adaptive
TensorFlow script starts (`-s 150 -m 300`: rank 150, r_max 300) and the
rank of each layer is logged every 5 steps. Sweep: dense and tau in {0.05,
0.09, 0.11, 0.15, 0.17}, 3 seeds each (the paper reports one run).

  python -m experiments.dlrt_mlp_rank_dynamics.run
  python -m lrtrain.sweep --config experiments/dlrt_mlp_rank_dynamics/config.py \
      --all --workdir runs/dlrt_mlp_rank_dynamics
  python -m experiments.dlrt_mlp_rank_dynamics.run --dataset=mnist

Scale here: the full Fashion-MNIST training set, 1,000 steps of batch 128
(2.2 epochs; the paper: MNIST 60k, to convergence).

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022.
"""

from lrtrain import config_utils as cu

TAUS = (0.05, 0.09, 0.11, 0.15, 0.17)
SEEDS = (0, 1, 2)
_ARGS = dict(runlocal=False, dataset="fashion_mnist", tau=0.1, seed=0,
             steps=1000, max_train=0, rank=150, r_max=300, width=784)


def get_config(arg=None):
  """arg: runlocal, dataset, tau, seed, steps, max_train, rank, r_max, width."""
  a = cu.parse_arg(arg, **_ARGS)
  c = cu.base_config()
  c.seed = a.seed
  # --- Data ---
  c.data.name = a.dataset
  c.data.max_train = a.max_train    # examples (0 = all)
  c.data.validation_size = 1000     # examples
  # --- Model: 4 factorized hidden layers, dense head ---
  c.model.name = "mlp"
  c.model.widths = (a.width,) * 4   # hidden units
  c.model.factor.kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank
  # --- Integrator ---
  c.integrator.name = "kls"
  c.integrator.tau = a.tau
  c.integrator.adaptive = True
  c.integrator.r_max = a.r_max      # the authors' cap (floor(784 / 2) = 392 allowed)
  # --- Optimizer: the paper's Adam 1e-3 ---
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  # --- Loop ---
  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 100          # steps
  c.train.log_every = 5             # steps (rank curves)
  c.train.checkpoint_every = 100    # steps
  c.train.eval_batch_size = 1000    # examples
  c.diagnostics.enabled = False
  c.logging.progress = False
  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.validation_size = 64
    c.model.widths = (64,) * 4
    c.model.factor.rank = 4
    c.integrator.r_max = 0
  return c


def get_sweep(arg=None):
  """Dense, then the tau grid, each over SEEDS (runlocal: dense and one
  tau, one seed)."""
  a = cu.parse_arg(arg, **_ARGS)
  taus = TAUS[:1] if a.runlocal else TAUS
  seeds = cu.sweep("seed", SEEDS[:1] if a.runlocal else SEEDS)
  dense = cu.product([{"integrator.name": "dense", "model.factor.kind": "dense"}], seeds)
  return cu.chain(dense, cu.product(cu.sweep("integrator.tau", taus), seeds))
