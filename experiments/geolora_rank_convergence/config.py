"""GeoLoRA rank convergence: one-pass rank-adaptive training from initial
ranks 2..64 on an MLP / Fashion-MNIST, against two-pass KLS (DLRT).

  python -m experiments.geolora_rank_convergence.run
  # = python -m lrtrain.sweep --config experiments/geolora_rank_convergence/config.py \
  #       --all --workdir runs/geolora_rank_convergence  + the report step

Scale (2-core shared CPU): 784-256-256-10 MLP, both hidden layers U S V^T,
12k training examples, batch 128, 400 Adam steps (~4 epochs), tau 0.3.
Expected: ~6 min; every GeoLoRA run ends at about the same trainable
parameter count whatever its initial rank. `dataset=mnist` gives the same
study on MNIST (needs the files or data.download on a connected machine).

References:
  Schotthoefer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric
  integration for parameter efficient fine-tuning", ICLR 2025.
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (KLS).
"""

from lrtrain import config_utils as cu

INITIAL_RANKS = (2, 4, 8, 16, 32, 64)
KLS_RANKS = (2, 64)


def get_config(arg=None):
  """arg: runlocal, dataset, tau, rank, seed, steps, method."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist", tau=0.3,
                   rank=8, seed=0, steps=400, method="geolora")
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = a.dataset
  c.data.max_train = 12000          # examples (subset for the CPU budget)
  c.data.validation_size = 2000     # examples

  c.model.name = "mlp"
  c.model.widths = (256, 256)       # hidden units
  c.model.factor.kind = "lowrank"
  c.model.factor.rank = a.rank      # initial rank r0 of both hidden layers

  c.integrator.name = a.method      # geolora (1 backward) | kls (2 backward)
  c.integrator.tau = a.tau          # relative truncation tolerance (paper: 0.3)
  c.integrator.adaptive = True
  c.integrator.r_min = 2            # smallest rank per layer
  c.integrator.r_max = 128          # largest rank per layer
  c.integrator.basis_period = 1     # basis step every 2nd step, as the committed results/ were run

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3  # paper's lr
  c.optimizer.schedule = "constant"

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 100          # steps
  c.train.log_every = 10            # steps (rank/<layer> rows)
  c.train.checkpoint_every = 200    # steps
  c.diagnostics.every = 25          # steps (params/train rows)
  c.diagnostics.heavy_tail = False
  c.logging.progress = False

  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.model.widths = (32,)
    c.integrator.r_max = 16
    c.train.num_steps = 4
  return c


def get_sweep(arg=None):
  """GeoLoRA from every initial rank, then KLS from the extreme ones."""
  runlocal = "runlocal" in (arg or "")
  geo = INITIAL_RANKS[:1] if runlocal else INITIAL_RANKS
  kls = KLS_RANKS[:1] if runlocal else KLS_RANKS
  return cu.chain(
      cu.product(cu.sweep("integrator.name", ["geolora"]),
                 cu.sweep("model.factor.rank", geo)),
      cu.product(cu.sweep("integrator.name", ["kls"]),
                 cu.sweep("model.factor.rank", kls)))
