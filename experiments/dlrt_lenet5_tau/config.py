"""DLRT tau sweep on LeNet5 (Schotthoefer et al., NeurIPS 2022, Table 2).

Rank-adaptive KLS on every conv and hidden dense layer (convs as
(c_out, kh kw c_in) matrices), the head dense, started where the authors
start: at the caps floor(min(n, m) / 2) = 10 / 25 / 250 (also r_max).
Sweep: dense baseline plus tau in {0.09, 0.15, 0.3, 0.45}, 3 seeds each.

  python -m experiments.dlrt_lenet5_tau.run
  python -m lrtrain.sweep --config experiments/dlrt_lenet5_tau/config.py \\
      --all --workdir runs/dlrt_lenet5_tau      # the runs only
  python -m experiments.dlrt_lenet5_tau.run --dataset=mnist   # connected machine

Scale here: full Fashion-MNIST training set, 1,000 steps of batch 128
(2.2 epochs; the paper: MNIST, 20 epochs). About 27 min on a 2-core CPU.

References:
  Schotthoefer, Zangrando, Kusch, Ceruti, Tudisco, "Low-rank lottery
  tickets", NeurIPS 2022.
"""

from lrtrain import config_utils as cu

TAUS = (0.09, 0.15, 0.3, 0.45)
SEEDS = (0, 1, 2)


def get_config(arg=None):
  """arg: runlocal, dataset, tau, seed, steps, max_train, rank."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist", tau=0.1,
                   seed=0, steps=1000, max_train=0, rank=500)
  c = cu.base_config()
  c.seed = a.seed
  # --- Data ---
  c.data.name = a.dataset
  c.data.max_train = a.max_train    # examples (0 = all)
  c.data.validation_size = 1000     # examples held out of train
  # --- Model: LeNet5, U S V^T everywhere but the head ---
  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank, clipped per layer to r_max:
  c.model.factor.clip_rank = True   # 10 / 25 / 250, where the authors start
  # --- Integrator: rank-adaptive KLS ---
  c.integrator.name = "kls"
  c.integrator.tau = a.tau          # relative truncation tolerance
  c.integrator.adaptive = True
  c.integrator.r_max = 0            # floor(min(n, m)/2): 10 / 25 / 250
  # --- Optimizer: the paper's plain SGD, lr 0.05 (with momentum 0.9 the
  # rank-adaptive runs diverged at tau 0.13 and collapsed at tau 0.11) ---
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.schedule = "constant"
  # --- Loop ---
  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 100          # steps
  c.train.log_every = 10            # steps
  c.train.checkpoint_every = 250    # steps
  c.train.eval_batch_size = 1000    # examples
  c.diagnostics.enabled = False     # SVD diagnostics not needed here
  c.logging.progress = False
  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.validation_size = 64
    c.model.factor.rank = 4
  return c


def get_sweep(arg=None):
  """Dense baseline and the tau grid, each over SEEDS (runlocal: 2 points)."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist", tau=0.1,
                   seed=0, steps=1000, max_train=0, rank=500)
  seeds = cu.sweep("seed", SEEDS[:1] if a.runlocal else SEEDS)
  taus = TAUS[-1:] if a.runlocal else TAUS
  dense = cu.product([{"integrator.name": "dense", "model.factor.kind": "dense",
                       "model.factor.conv_kind": "dense"}], seeds)
  return cu.chain(dense, cu.product(cu.sweep("integrator.tau", taus), seeds))
