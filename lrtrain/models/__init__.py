"""Models (Flax linen) with per-layer factorized kernels, built from a config.

`build(model_cfg, num_classes=..., input_shape=...)` returns a linen Module
called as `module.apply({'params': params}, x, train=False)`; it returns
logits (b, classes), or (b, T, vocab) for the language models (the
transformer on token inputs, llama).

Per-layer factor resolution (`FactorPolicy.spec`): every factorizable layer
gets model.factor.kind (dense layers) or model.factor.conv_kind (conv
layers; 'same' = the dense kind, 'tucker' only for convs); a layer whose
path matches an entry of model.dense_layers (exact path, its last
component, or an fnmatch pattern such as 'block*/mlp/*') stays dense.
Every model names its output layer 'head', and the default
model.dense_layers = ('head',) keeps the last layer dense as in DLRT.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lrtrain.factorizations import conv as conv_lib
from lrtrain.layers import FactorSpec

MODEL_NAMES = ("mlp", "lenet5", "vgg", "transformer", "llama")
LM_MODELS = ("transformer", "llama")   # the models that take token sequences
DENSE_KINDS = ("dense", "lowrank", "lora", "sltrain")
CONV_KINDS = ("dense", "lowrank", "tucker", "lora", "sltrain", "same")


def default_model_config() -> ml_collections.ConfigDict:
  """Every model field with its default (unlocked ConfigDict)."""
  m = ml_collections.ConfigDict()
  m.name = "mlp"                    # mlp|lenet5|vgg|transformer|llama
  m.widths = (64,)                  # MLP hidden widths (units per layer)
  m.factor = ml_collections.ConfigDict()
  m.factor.kind = "lowrank"         # dense layers: dense|lowrank|lora|sltrain
  m.factor.conv_kind = "same"       # conv layers: dense|lowrank|tucker|lora|sltrain|same
  m.factor.rank = 16                # initial rank r of LowRank / Lora / SLTrain layers
  m.factor.clip_rank = False        # cap ranks at half the layer's dims (layers.FactorSpec)
  m.factor.capacity = 0             # LowRank buffer columns (0 = rank)
  m.factor.tucker_ranks = (8, 8)    # Tucker (r_out, r_in) channel ranks
  m.factor.alpha = 0.0              # Lora / SLTrain scale numerator (0 = rank: scale 1)
  m.factor.rank_stabilised = False  # Lora / SLTrain scale alpha / sqrt(r) (rsLoRA)
  m.factor.sparse_density = 0.03    # SLTrain: fraction of entries in the fixed sparse support
  m.factor.init = "random"          # random|flat|svd (see layers.matrix_node)
  m.factor.adapter = False          # with init_from: LowRank layers start as W0 = pretrained, S = 0
  m.dense_layers = ("head",)        # layer paths/patterns kept dense
  m.init_from = ""                  # workdir of a trained run to start from (lrtrain/pretrained.py)
  m.conv_impl = "auto"              # auto|im2col|xla (factorizations/conv.py)
  # Transformer (char LM for (T,) int inputs, ViT for images) and llama.
  m.d_model = 64                    # residual width
  m.num_heads = 4                   # attention heads
  m.num_layers = 2                  # transformer blocks
  m.mlp_dim = 128                   # hidden width of the block MLP
  m.patch_size = 4                  # ViT patch side (pixels)
  m.max_len = 128                   # longest sequence (LM) / patch count (ViT)
  m.tie_embeddings = False          # llama: logits from the transposed embedding
  m.rope_theta = 10000.0            # llama: base of the rotary frequencies
  return m


@dataclasses.dataclass(frozen=True)
class FactorPolicy:
  """Hashable per-model factor choice; `spec(path, conv)` per layer."""
  kind: str = "dense"
  conv_kind: str = "same"
  base: FactorSpec = FactorSpec()
  dense_layers: tuple[str, ...] = ("head",)

  @classmethod
  def from_config(cls, model_cfg) -> "FactorPolicy":
    """The policy of model_cfg.factor / model_cfg.dense_layers.

    Raises:
      ValueError: an unknown kind, conv_kind or init, or a sparse_density
        outside (0, 1).
    """
    f = model_cfg.factor
    if f.kind not in DENSE_KINDS:
      raise ValueError(f"unknown model.factor.kind={f.kind!r}; valid: "
                       f"{', '.join(DENSE_KINDS)}")
    if f.conv_kind not in CONV_KINDS:
      raise ValueError(f"unknown model.factor.conv_kind={f.conv_kind!r}; valid: "
                       f"{', '.join(CONV_KINDS)}")
    # .get: a config.json written before the field existed (model.init_from).
    density = float(f.get("sparse_density", FactorSpec.sparse_density))
    if not 0.0 < density < 1.0:
      raise ValueError(f"model.factor.sparse_density={density} must be in "
                       "(0, 1) (the paper uses 0.03)")
    tr = tuple(int(t) for t in f.tucker_ranks)
    if len(tr) != 2:
      raise ValueError(f"model.factor.tucker_ranks={tr} must be (r_out, r_in)")
    base = FactorSpec(kind="lowrank", rank=int(f.rank),
                      clip_rank=bool(f.clip_rank),
                      capacity=int(f.capacity),
                      tucker_ranks=tr, alpha=float(f.alpha),
                      rank_stabilised=bool(f.rank_stabilised), init=str(f.init),
                      sparse_density=density)
    return cls(kind=f.kind, conv_kind=f.conv_kind, base=base,
               dense_layers=tuple(model_cfg.dense_layers))

  def keeps_dense(self, path: str) -> bool:
    last = path.rsplit("/", 1)[-1]
    return any(path == p or last == p or fnmatch.fnmatchcase(path, p)
               for p in self.dense_layers)

  def spec(self, path: str, conv: bool = False) -> FactorSpec | None:
    """FactorSpec of the layer at `path` (None: dense kernel)."""
    kind = self.kind
    if conv and self.conv_kind != "same":
      kind = self.conv_kind
    if kind == "dense" or self.keeps_dense(path):
      return None
    return dataclasses.replace(self.base, kind=kind)


def build(model_cfg, *, num_classes: int, input_shape: tuple) -> nn.Module:
  """The model named by model_cfg.name, checked on input_shape.

  Args:
    model_cfg: ConfigDict with the fields of `default_model_config`.
    num_classes: output classes (vocabulary size for the char LM, output
      dimension for regression).
    input_shape: shape of one example: (8, 8, 1), (28, 28, 1), (T,), ...

  Returns:
    A flax.linen Module; `module.init(key, x)` gives {'params': ...}.

  Raises:
    ValueError: unknown model name, a rank too large for a layer (naming
      the layer), or an input shape the model cannot take.
  """
  # Imported here so that the submodules can import this package's helpers.
  from lrtrain.models import lenet, llama, mlp, transformer, vgg  # pylint: disable=g-import-not-at-top
  name = model_cfg.name
  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model model.name={name!r}; valid: "
                     f"{', '.join(MODEL_NAMES)}")
  policy = FactorPolicy.from_config(model_cfg)
  input_shape = tuple(int(d) for d in input_shape)
  impl = model_cfg.conv_impl
  if impl not in conv_lib.IMPLS:
    raise ValueError(f"unknown model.conv_impl={impl!r}; valid: "
                     f"{', '.join(conv_lib.IMPLS)}")
  if name == "mlp":
    module = mlp.MLP(widths=tuple(int(w) for w in model_cfg.widths),
                     num_classes=num_classes, policy=policy)
  elif name == "lenet5":
    lenet.check_input(input_shape)
    module = lenet.LeNet5(num_classes=num_classes, policy=policy, impl=impl)
  elif name == "vgg":
    vgg.check_input(input_shape)
    module = vgg.VGG(num_classes=num_classes, policy=policy, impl=impl)
  elif name == "llama":
    module = llama.make(model_cfg, num_classes=num_classes,
                        input_shape=input_shape, policy=policy)
  else:
    module = transformer.make(model_cfg, num_classes=num_classes,
                              input_shape=input_shape, policy=policy)
  # Trace an init once (shapes only) so bad ranks or shapes fail here, with
  # the layer's name, instead of inside the first jitted step.
  dtype = jnp.int32 if getattr(module, "is_lm", False) else jnp.float32
  x = jax.ShapeDtypeStruct((1,) + input_shape, dtype)
  jax.eval_shape(lambda k, x: module.init(k, x, train=False), jax.random.PRNGKey(0), x)
  return module


def init_params(module: nn.Module, key: jax.Array, input_shape: tuple,
                dtype=None):
  """params (the 'params' collection) of `module` for one example shape."""
  if dtype is None:
    dtype = jnp.int32 if getattr(module, "is_lm", False) else jnp.float32
  x = jnp.zeros((1,) + tuple(input_shape), dtype)
  return module.init(key, x, train=False)["params"]


__all__ = ["build", "default_model_config", "init_params", "FactorPolicy",
           "FactorSpec", "MODEL_NAMES"]
