"""LoRA adapters on a small character-level transformer LM.

Every attention and MLP kernel is W0 + (alpha / r) B A with W0 frozen, the
embedding and head trained densely. With integrator 'lora' the adapters get
plain optax; 'geolora' swaps in the geometric rank-adaptive update; 'relora'
merges the adapters into W0 and restarts them every
integrator.relora_period steps, with the jagged cosine schedule.

  python -m lrtrain.main --config configs/lora_transformer.py --workdir runs/lora
  python -m lrtrain.main --config configs/lora_transformer.py:method=galore --workdir runs/galore
  python -m lrtrain.main --config configs/lora_transformer.py:method=relora --workdir runs/relora

Expected: about 5 min on 2 CPU cores; the character-level loss falls well
below log(vocab).

References:
  Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022.
  Lialin et al., "ReLoRA: High-rank training through low-rank updates",
  ICLR 2024.
"""

from lrtrain import config_utils as cu


def get_config(arg=None):
  """arg: runlocal, rank, seed, method, steps, lr."""
  a = cu.parse_arg(arg, runlocal=False, rank=8, seed=0, method="lora",
                   steps=2000, lr=1e-3)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = "chars"
  c.data.validation_size = 200      # windows held out
  c.data.max_train = 0

  c.model.name = "transformer"
  c.model.factor.kind = "lora" if a.method != "galore" else "dense"
  c.model.factor.rank = a.rank      # adapter rank
  c.model.factor.alpha = 16.0       # adapter scale numerator
  c.model.dense_layers = ("head", "embed*")
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_layers = 2
  c.model.mlp_dim = 256
  c.model.max_len = 64              # context length (characters)
  c.data.seq_len = c.model.get_ref("max_len")  # window = context

  c.integrator.name = a.method
  c.integrator.galore_rank = a.rank

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = a.lr  # peak
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100    # steps
  c.optimizer.clip_norm = 1.0
  if a.method == "relora":
    c.integrator.relora_period = 500  # steps between merges (= restart_period)
    c.optimizer.schedule = "jagged_cosine"
    c.optimizer.restart_warmup = 50   # steps of each restart's ramp

  c.train.batch_size = 32           # sequences
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = c.train.get_ref("num_steps") // 10
  c.train.log_every = 50            # steps
  c.train.checkpoint_every = c.train.get_ref("num_steps") // 4
  c.diagnostics.every = c.train.get_ref("num_steps") // 10

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.d_model = 32
    c.model.mlp_dim = 64
    c.model.num_layers = 1
    c.model.max_len = 16
    c.model.factor.rank = 4
    c.optimizer.warmup_steps = 1
    c.integrator.relora_period = 2    # one merge in the 3 steps
    c.optimizer.restart_warmup = 1
  return c


def get_sweep(arg=None):
  """Adapter rank x learning rate x seeds."""
  del arg
  return cu.product(cu.sweep("model.factor.rank", [4, 8, 16]),
                    cu.sweep("optimizer.learning_rate", [5e-4, 1e-3]),
                    cu.sweep("seed", [0]))
