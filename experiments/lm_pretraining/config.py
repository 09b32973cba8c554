"""Low-rank pretraining methods on one small LLaMA, one token budget.

The model and the method wiring are configs/llama_lm.py's; this study fixes
a smaller shape that trains on a 2-core CPU and sweeps every pretraining
method x 3 seeds on the same byte-level text (the World English Bible,
Debian's sword-text-web):

  model     LLaMA-style decoder, d 128, 4 heads, 4 layers, SwiGLU 344,
            context 128 bytes, vocabulary 256 (0.86M parameters dense)
  budget    600 steps of 16 sequences x 128 tokens = 1.23M training tokens
  optimizer Adam 2e-3, 10% linear warmup then cosine (ReLoRA: its jagged
            cosine, restarts every 150 steps with a 15-step ramp), clip 1
  methods   dense; galore (rank 32 projection, refreshed every 100 steps);
            factors (W = U S V^T at rank 32, plain Adam: the scaling
            study's factorized baseline); sltrain (B A at rank 32 + S at
            density 0.03, scale 1/4); relora (LoRA rank 32 on a frozen
            random W0, merged every 150 steps); kls and geolora
            (rank-adaptive DLRT / GeoLoRA from rank 32, tau 0.1)

Every q, k, v, o, gate, up and down kernel takes the method's
factorization; the embedding and head stay dense.

  python -m experiments.lm_pretraining.run
  python -m lrtrain.sweep --config experiments/lm_pretraining/config.py --all \\
      --workdir runs/lm_pretraining            # the runs only

References:
  Zhao et al., "GaLore", ICML 2024; Han et al., "SLTrain", NeurIPS 2024;
  Lialin et al., "ReLoRA", ICLR 2024; Schotthoefer et al., "Low-rank
  lottery tickets", NeurIPS 2022 and "GeoLoRA", ICLR 2025.
"""

import importlib.util
import os

from lrtrain import config_utils as cu

METHODS = ("dense", "galore", "factors", "sltrain", "relora", "kls", "geolora")
SEEDS = (0, 1, 2)
RANK = 32
LM_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "llama_lm.py")
_ARGS = dict(runlocal=False, method="dense", seed=0, steps=600)


def _lm():
  """configs/llama_lm.py as a module (the model and the method wiring)."""
  spec = importlib.util.spec_from_file_location("llama_lm_config", LM_CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg=None):
  """arg: runlocal, method (METHODS), seed, steps."""
  a = cu.parse_arg(arg, **_ARGS)
  lm_arg = f"method={a.method},seed={a.seed},steps={a.steps},rank={RANK},lr=0.002"
  c = _lm().get_config(lm_arg + (",runlocal" if a.runlocal else ""))
  if not a.runlocal:
    c.model.d_model = 128
    c.model.num_heads = 4
    c.model.num_layers = 4
    c.model.mlp_dim = 344             # SwiGLU hidden width (~8/3 d)
    c.model.max_len = 128             # context, bytes
  c.integrator.update_proj_gap = 100  # galore: projector refresh, steps
  c.train.eval_every = 100            # steps
  c.train.log_every = 25              # steps
  c.diagnostics.every = 100           # steps (stable ranks per layer)
  c.logging.progress = False
  return c


def get_sweep(arg=None):
  """Every method x every seed (runlocal: every method, one seed)."""
  a = cu.parse_arg(arg, **_ARGS)
  seeds = SEEDS[:1] if a.runlocal else SEEDS
  rank = 4 if a.runlocal else RANK
  return [{**_lm().method_fields(m, rank, a.steps), "seed": s}
          for m in METHODS for s in seeds]
