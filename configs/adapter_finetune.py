"""Adapter fine-tuning: pretrain a dense model on task A, then fine-tune
rank-adaptive adapters W0 + U S V^T (W0 the pretrained kernel, frozen;
S = 0) on task B with GeoLoRA and the authors' schedule.

  # 1. task A (Fashion-MNIST classes 0-4), dense
  python -m lrtrain.main --config configs/adapter_finetune.py --workdir runs/pre
  # 2. task B (classes 5-9), adapters on every hidden / attention / MLP layer
  python -m lrtrain.main --config configs/adapter_finetune.py:init_from=runs/pre \\
      --workdir runs/ft

`model=vit` gives the same two stages with the small ViT (patches of 4 x 4,
2 blocks of width 64). Without `init_from` the config is the pretraining
run; with it, the fine-tuning run (`model.init_from`, lrtrain/pretrained.py).
Augment every c + 1 = 51 steps, truncate 37 steps later (integrator.
basis_period, integrator.truncation_delay), tau 0.15, Adam 1e-3, as in the
GeoLoRA authors' ViT run script (third_party/published/authors_code.md).

References:
  Schotthoefer, Zangrando, Ceruti, Tudisco, Kusch, "GeoLoRA: geometric
  integration for parameter efficient fine-tuning", ICLR 2025.
"""

from lrtrain import config_utils as cu

TASK_A, TASK_B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
PERIOD = 50                         # c: augment every c + 1 steps


def get_config(arg=None):
  """arg: runlocal, model (mlp|vit), init_from, rank, tau, method, seed, steps."""
  a = cu.parse_arg(arg, runlocal=False, model="mlp", init_from="", rank=4,
                   tau=0.15, method="geolora", seed=0, steps=0)
  c = cu.base_config()
  c.seed = a.seed
  finetune = bool(a.init_from)
  c.data.name = "fashion_mnist"
  c.data.classes = TASK_B if finetune else TASK_A
  c.data.validation_size = 2000     # examples

  if a.model == "vit":
    c.model.name = "transformer"
    c.model.patch_size = 4          # 28 x 28 -> 49 patches
    c.model.max_len = 64            # positions (>= patches)
    c.model.d_model = 64            # residual width
    c.model.num_heads = 4
    c.model.num_layers = 2
    c.model.mlp_dim = 128
  else:
    c.model.name = "mlp"
    c.model.widths = (256, 256)     # hidden units

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.train.batch_size = 128          # examples

  if finetune:
    c.model.init_from = a.init_from   # the pretraining run's workdir
    c.model.factor.kind = "lowrank"
    c.model.factor.adapter = True     # W0 = pretrained kernel (frozen), S = 0
    c.model.factor.rank = a.rank      # initial adapter rank r0
    c.integrator.name = a.method
    c.integrator.tau = a.tau
    c.integrator.basis_period = PERIOD
    c.integrator.truncation_delay = 3 * PERIOD // 4
    c.train.num_steps = a.steps or 20 * (PERIOD + 1)   # ends after a truncation
    c.train.log_every = PERIOD + 1    # steps: ranks at the end of each cycle
    c.diagnostics.every = PERIOD + 1
  else:
    c.model.factor.kind = "dense"
    c.integrator.name = "dense"
    c.train.num_steps = a.steps or 1000
    c.diagnostics.enabled = False
  c.train.eval_every = c.train.num_steps // 5
  c.train.checkpoint_every = c.train.num_steps // 2

  if a.runlocal:
    cu.shrink_for_local(c)
    c.data.name = "digits"
    c.data.validation_size = 64
    if a.model == "mlp":
      c.model.widths = (32,)
    else:
      c.model.patch_size = 4        # 8 x 8 digits -> 4 patches
  return c


def get_sweep(arg=None):
  """Initial adapter ranks (fine-tuning; needs init_from)."""
  if "init_from=" not in (arg or ""):
    return [{}]
  return cu.sweep("model.factor.rank", [2, 4, 8, 16, 32, 64])
