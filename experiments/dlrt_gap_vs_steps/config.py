"""Dense vs rank-adaptive DLRT on LeNet5: the accuracy gap as training runs.

The same LeNet5, optimizer, batches and number of steps for both; DLRT
starts at the paper's caps (rank 250 requested, clipped per layer to
floor(min(n, m) / 2) = 10 / 25 / 250) with tau 0.11, as in the authors'
logged runs (third_party/published/dlrt_lenet5_mnist_epochs.csv).

  python -m experiments.dlrt_gap_vs_steps.run
  python -m lrtrain.sweep --config experiments/dlrt_gap_vs_steps/config.py --index I --workdir runs/dlrt_gap_vs_steps

Scale here: Fashion-MNIST, 55,000 training examples, batch 128, 4,000 steps
(9.3 epochs), plain SGD lr 0.05 constant (the paper's), validation accuracy
every 200 steps.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022.
"""

from lrtrain import config_utils as cu

_ARGS = dict(runlocal=False, dataset="fashion_mnist", seed=0, steps=4000,
             tau=0.11, lr=0.05)


def get_config(arg=None):
  """arg: runlocal, dataset, seed, steps, tau, lr."""
  a = cu.parse_arg(arg, **_ARGS)
  c = cu.base_config()
  c.seed = a.seed
  # --- Data ---
  c.data.name = a.dataset
  c.data.validation_size = 5000     # examples
  # --- Model: conv1, conv2, fc1 as U S V^T from the paper's caps ---
  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = 250         # requested; clipped to 10 / 25 / 250
  c.model.factor.clip_rank = True
  # --- Integrator: rank-adaptive KLS ('dense' set by the sweep) ---
  c.integrator.name = "kls"
  c.integrator.adaptive = True
  c.integrator.tau = a.tau
  # --- Optimizer: the paper's plain SGD ---
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a.lr
  c.optimizer.schedule = "constant"
  # --- Loop ---
  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 200          # steps (validation accuracy curve)
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = 0      # end only
  c.train.eval_batch_size = 1000    # examples
  c.diagnostics.enabled = False
  c.logging.progress = False
  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.factor.rank = 8
  return c


def get_sweep(arg=None):
  """Dense, then DLRT (same everything else)."""
  del arg
  return [{"integrator.name": "dense", "model.factor.kind": "dense",
           "model.factor.conv_kind": "dense"},
          {"integrator.name": "kls"}]
