"""GeoLoRA rank convergence: rank-adaptive training from initial ranks
2..64, as LoRA-style adapters on a pretrained model (the paper's setting)
and from scratch, on an MLP / Fashion-MNIST.

  python -m experiments.geolora_rank_convergence.run
  # pretrains (stage=pretrain), then the two sweeps:
  #   setting=adapter,init_from=<pretrain workdir>   GeoLoRA adapters, 3 seeds
  #   setting=scratch                                 GeoLoRA and KLS from scratch

Adapter setting: a dense 784-256-256-5 MLP pretrained on classes 0-4, then
both hidden layers get adapters W0 + U S V^T (W0 the pretrained kernel,
frozen; S = 0 on its top-r0 singular subspaces) trained on classes 5-9 with
the authors' schedule: augment every c + 1 = 51 steps, train the augmented
core, truncate int(3c / 4) = 37 steps later; tau 0.15, Adam 1e-3, 39 cycles
(1,989 steps: every run ends after a truncation). From scratch: both hidden
layers U S V^T from random factors, a basis step every 2nd step, tau 0.3,
400 steps (the configuration of the first version of this study).

References:
  Schotthoefer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric
  integration for parameter efficient fine-tuning", ICLR 2025.
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (KLS).
"""

from lrtrain import config_utils as cu

INITIAL_RANKS = (2, 4, 8, 16, 32, 64)
KLS_RANKS = (2, 64)
ADAPTER_SEEDS = (0, 1, 2)
TASK_A, TASK_B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
PERIOD = 50                             # c: augment every c + 1 steps
CYCLES = 39


def get_config(arg=None):
  """arg: runlocal, dataset, setting (adapter|scratch), stage
  (pretrain|train), init_from, tau (0: the setting's), rank, seed, method."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist",
                   setting="scratch", stage="train", init_from="", tau=0.0,
                   rank=8, seed=0, method="geolora")
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
  c.integrator.adaptive = True
  c.integrator.r_min = 2            # smallest rank per layer

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3  # paper's lr
  c.optimizer.schedule = "constant"

  c.train.batch_size = 128          # examples
  c.diagnostics.heavy_tail = False
  c.logging.progress = False

  if a.setting == "adapter":
    c.data.classes = TASK_A if a.stage == "pretrain" else TASK_B
    c.model.init_from = a.init_from   # the pretrained run's workdir
    c.model.factor.adapter = True     # W0 = pretrained kernel, S = 0
    c.integrator.tau = a.tau or 0.15  # the authors' run script
    c.integrator.basis_period = PERIOD
    c.integrator.truncation_delay = 3 * PERIOD // 4
    c.train.num_steps = CYCLES * (PERIOD + 1)   # steps
    c.train.eval_every = 10 * (PERIOD + 1)      # steps
    c.train.log_every = PERIOD + 1    # steps: ranks at the end of each cycle
    c.train.checkpoint_every = 0      # the last step only
    c.diagnostics.every = PERIOD + 1  # steps (params/train after each truncation)
    if a.stage == "pretrain":
      c.model.factor.kind = "dense"
      c.integrator.name = "dense"
      c.train.num_steps = 1000        # steps (~20 epochs of the 6k task-A examples)
      c.train.eval_every = 250
      c.diagnostics.enabled = False
  else:
    c.integrator.tau = a.tau or 0.3   # the paper's value
    c.integrator.r_max = 128          # largest rank per layer
    c.integrator.basis_period = 1     # basis step every 2nd step
    c.train.num_steps = 400           # steps
    c.train.eval_every = 100          # steps
    c.train.log_every = 10            # steps (rank/<layer> rows)
    c.train.checkpoint_every = 200    # steps
    c.diagnostics.every = 25          # steps (params/train rows)

  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.model.widths = (32,)
    c.integrator.r_max = 16
    if a.setting == "adapter":      # two cycles, rows at their ends
      c.train.num_steps = 2 * (PERIOD + 1)
      c.train.eval_every = c.train.log_every = PERIOD + 1
      c.train.checkpoint_every = c.diagnostics.every = PERIOD + 1
    else:
      c.train.num_steps = 4
  return c


def get_sweep(arg=None):
  """adapter: GeoLoRA from every initial rank and seed; scratch: GeoLoRA
  from every initial rank, then KLS from the extreme ones (one seed)."""
  runlocal = "runlocal" in (arg or "")
  geo = INITIAL_RANKS[:1] if runlocal else INITIAL_RANKS
  if "setting=adapter" in (arg or ""):
    if "stage=pretrain" in (arg or ""):
      return [{}]
    seeds = ADAPTER_SEEDS[:1] if runlocal else ADAPTER_SEEDS
    return cu.product(cu.sweep("model.factor.rank", geo),
                      cu.sweep("seed", seeds))
  kls = KLS_RANKS[:1] if runlocal else KLS_RANKS
  return cu.chain(
      cu.product(cu.sweep("integrator.name", ["geolora"]),
                 cu.sweep("model.factor.rank", geo)),
      cu.product(cu.sweep("integrator.name", ["kls"]),
                 cu.sweep("model.factor.rank", kls)))
