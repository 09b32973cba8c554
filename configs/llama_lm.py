"""LLaMA-style language-model pretraining, dense or low-rank, one config.

The model (lrtrain/models/llama.py) trains from scratch on next-token
prediction; every method goes through the common step. Sizes:

  tiny  d 192, 4 heads, 4 layers, SwiGLU 512, context 128, byte-level
        tokens (vocabulary 256) of the default corpus, the World English
        Bible (`apt-get install -y sword-text-web`): 1.87M parameters, a
        CPU model (batch 16: about 2 steps/s on one core).
  60m   d 512, 8 heads, 8 layers, SwiGLU 1376, context 256, vocabulary
        32000 from a token file: 58.1M parameters (GaLore's "60M").
  130m  d 768, 12 heads, 12 layers, SwiGLU 2048, context 256, vocabulary
        32000 from a token file: 134.1M parameters (GaLore's "130M").

60m / 130m read pre-tokenized text: a flat uint16 file of token ids
(e.g. a 32000-token LLaMA / T5 tokenizer's output), `token_file=...`.
Adam with linear warmup over the first 10% of the steps, then cosine decay
to zero, gradient clipping at 1 (as in the GaLore and ReLoRA experiments).

Methods and the kernels they train (q, k, v, o, gate, up, down; the
embedding, norms and head stay dense):
  dense, galore   dense kernels (GaLore projects the gradients, rank `rank`)
  factors         plain Adam on U, S, V of a fixed-rank U S V^T
  lora            frozen random W0 + B A (plain Adam on A, B)
  kls, geolora, tdlrt   rank-adaptive U S V^T (tau 0.1), starting at `rank`
  condlr          orthonormal factors, approx_orth core
  sltrain         scale B A + S, S on a fixed random support (density 0.03)
  relora          LoRA merged into W0 and restarted 4 times per run

  python -m lrtrain.main --config configs/llama_lm.py --workdir runs/llama_tiny
  python -m lrtrain.main --config configs/llama_lm.py:method=kls,rank=32 --workdir runs/llama_kls
  python -m lrtrain.main --config configs/llama_lm.py:size=60m,method=galore,token_file=/data/c4.u16 --workdir runs/galore60m

metrics.jsonl holds eval/perplexity (and eval/bits_per_byte for the byte
level tiny size); summary.json the test split's.

References:
  Touvron et al., "LLaMA: Open and efficient foundation language models", 2023;
  Zhao et al., "GaLore: Memory-efficient LLM training by gradient low-rank
    projection", ICML 2024 (model shapes, Table 5);
  Lialin et al., "ReLoRA: High-rank training through low-rank updates",
    ICLR 2024.
"""

from lrtrain import config_utils as cu

# size -> (d_model, num_heads, num_layers, mlp_dim, context, batch, steps, rank)
SIZES = {
    "tiny": (192, 4, 4, 512, 128, 16, 2000, 32),
    "60m": (512, 8, 8, 1376, 256, 128, 10_000, 128),
    "130m": (768, 12, 12, 2048, 256, 128, 20_000, 256),
}
PAPER_VOCAB = 32000           # 60m / 130m token files

# method -> (integrator.name, adaptive, model.factor.kind)
METHODS = {
    "dense": ("dense", False, "dense"),
    "galore": ("galore", False, "dense"),
    "factors": ("factors", False, "lowrank"),
    "lora": ("lora", False, "lora"),
    "kls": ("kls", True, "lowrank"),
    "geolora": ("geolora", True, "lowrank"),
    "tdlrt": ("tdlrt", True, "lowrank"),
    "condlr": ("condlr", False, "lowrank"),
    "sltrain": ("sltrain", False, "sltrain"),
    "relora": ("relora", False, "lora"),
}


def method_fields(method: str, rank: int, steps: int) -> dict:
  """The config fields (dotted paths) that select `method`: get_config sets
  them, and sweeps over methods use them as their points."""
  name, adaptive, kind = METHODS[method]
  fields = {"integrator.name": name, "integrator.adaptive": adaptive,
            "model.factor.kind": kind}
  if method == "sltrain":
    # Scale alpha / r = 1/4 of the low-rank part (the SLTrain scripts' alpha
    # 32 at r 128 for the 60M model).
    fields["model.factor.alpha"] = rank / 4
  if method == "relora":
    # Four merges per run, the learning rate restarted at each with a ramp
    # of a tenth of the period (ReLoRA's jagged cosine).
    period = max(steps // 4, 2)
    fields.update({"integrator.relora_period": period,
                   "optimizer.schedule": "jagged_cosine",
                   "optimizer.restart_warmup": max(period // 10, 1)})
  return fields


def get_config(arg=None):
  """arg: runlocal, size (tiny|60m|130m), method (see METHODS), rank (0: the
  size's), seed, steps (0: the size's), lr, token_file, vocab."""
  a = cu.parse_arg(arg, runlocal=False, size="tiny", method="dense", rank=0,
                   seed=0, steps=0, lr=1e-3, token_file="", vocab=PAPER_VOCAB)
  if a.size not in SIZES:
    raise cu.ConfigError(f"llama_lm: size must be one of {', '.join(SIZES)}, "
                         f"got {a.size!r}")
  if a.method not in METHODS:
    raise cu.ConfigError(f"llama_lm: method must be one of "
                         f"{', '.join(METHODS)}, got {a.method!r}")
  d, heads, layers, mlp, context, batch, steps, rank = SIZES[a.size]
  rank = a.rank or rank
  steps = a.steps or steps
  c = cu.base_config()
  c.seed = a.seed
  if a.token_file or (a.size != "tiny" and not a.runlocal):
    c.data.name = "tokens"
    c.data.token_file = a.token_file   # '' stops at load, naming the field
    c.data.token_dtype = "uint16"
    c.data.vocab_size = a.vocab
  else:
    c.data.name = "text"              # UTF-8 bytes of the default corpus
  c.data.validation_size = 200        # windows per eval split
  c.data.holdout_fraction = 0.02      # stream tail: validation, then test

  c.model.name = "llama"
  c.model.d_model = d
  c.model.num_heads = heads
  c.model.num_layers = layers
  c.model.mlp_dim = mlp               # SwiGLU hidden width
  c.model.max_len = context           # tokens
  c.model.tie_embeddings = False
  c.model.factor.rank = rank          # initial rank of every factorized kernel ...
  c.model.factor.clip_rank = True     # ... capped at min(n, m) // 2
  c.model.dense_layers = ("head",)
  c.data.seq_len = c.model.get_ref("max_len")  # window = context

  c.integrator.tau = 0.1              # relative truncation tolerance
  c.integrator.variant = "approx_orth"
  c.integrator.galore_rank = rank
  c.integrator.update_proj_gap = 200  # steps (GaLore's T)

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = a.lr    # peak
  c.optimizer.b2 = 0.999
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = steps // 10
  c.optimizer.clip_norm = 1.0

  c.train.batch_size = batch          # sequences
  c.train.eval_batch_size = batch
  c.train.num_steps = steps
  c.train.eval_every = max(steps // 10, 1)
  c.train.log_every = 50              # steps
  c.train.checkpoint_every = max(steps // 4, 1)
  c.diagnostics.every = max(steps // 10, 1)

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.d_model = 32
    c.model.num_heads = 2
    c.model.num_layers = 1
    c.model.mlp_dim = 88
    c.model.max_len = 16
    c.model.factor.rank = 4
    c.integrator.galore_rank = 4
    c.optimizer.warmup_steps = 1
  c = cu.apply_overrides(c, method_fields(a.method, rank, steps))
  c.unlock()
  return c


def get_sweep(arg=None):
  """Every method at the size in arg (one run each)."""
  a = cu.parse_arg(arg, runlocal=False, size="tiny", method="dense", rank=0,
                   seed=0, steps=0, lr=1e-3, token_file="", vocab=PAPER_VOCAB)
  _, _, _, _, _, _, steps, rank = SIZES.get(a.size, SIZES["tiny"])
  return [method_fields(m, a.rank or rank, a.steps or steps) for m in METHODS]
