"""A small pre-LayerNorm transformer: char-level LM or ViT-style classifier.

Mode follows the input: (b, T) int tokens -> causal LM with logits
(b, T, vocab); (b, h, w, c) images -> non-overlapping patches, a linear
patch embedding, bidirectional attention, mean pooling over patches and a
linear head (b, classes).

Factorizable layers (kernels per `policy`): 'block{i}/attn/{query,key,value,
out}' and 'block{i}/mlp/{fc1,fc2}'. The embeddings ('embed', 'pos_embed'),
the LayerNorms and 'head' always stay dense.

Axis legend: b = batch, T = tokens (or patches), d = d_model, h = heads,
k = d / h (head width), V = vocabulary.

References:
  Vaswani et al., "Attention is all you need", NeurIPS 2017;
  Dosovitskiy et al., "An image is worth 16x16 words", ICLR 2021;
  Hu et al., "LoRA: Low-rank adaptation of large language models", ICLR 2022.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from lrtrain import draws
from lrtrain.layers import Dense, attention


class Attention(nn.Module):
  """Multi-head self-attention with factorizable q/k/v/out projections."""
  d_model: int
  num_heads: int
  causal: bool
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    b, T, d = x_btd.shape
    h = self.num_heads
    k = d // h
    proj = lambda name: Dense(self.d_model, factor=self.policy.spec(
        f"{self.prefix}/{name}"), name=name)
    q = proj("query")(x_btd).reshape(b, T, h, k)
    kk = proj("key")(x_btd).reshape(b, T, h, k)
    v = proj("value")(x_btd).reshape(b, T, h, k)
    return proj("out")(attention(q, kk, v, self.causal))


class Block(nn.Module):
  """x + attn(ln1(x)); x + mlp(ln2(x)) with a gelu MLP fc1 -> fc2."""
  d_model: int
  num_heads: int
  mlp_dim: int
  causal: bool
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.policy
    x = x + Attention(self.d_model, self.num_heads, self.causal, p,
                      f"{self.prefix}/attn", name="attn")(nn.LayerNorm(name="ln1")(x))
    y = nn.LayerNorm(name="ln2")(x)
    y = MlpBlock(self.d_model, self.mlp_dim, p, f"{self.prefix}/mlp", name="mlp")(y)
    return x + y


class MlpBlock(nn.Module):
  d_model: int
  mlp_dim: int
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x):
    p = self.policy
    x = Dense(self.mlp_dim, factor=p.spec(f"{self.prefix}/fc1"), name="fc1")(x)
    x = nn.gelu(x)
    return Dense(self.d_model, factor=p.spec(f"{self.prefix}/fc2"), name="fc2")(x)


class Transformer(nn.Module):
  """Char LM (is_lm) or ViT classifier; see the module docstring.

  Attributes:
    num_classes: vocabulary size V (LM) or classes (ViT).
    is_lm: token inputs with a causal mask and per-token logits.
    d_model, num_heads, num_layers, mlp_dim: sizes.
    patch_size: ViT patch side.
    max_len: positions of the learned position embedding.
    policy: models.FactorPolicy.
  """
  num_classes: int
  is_lm: bool
  policy: object
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 128
  patch_size: int = 4
  max_len: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if self.is_lm:
      if x.ndim != 2:
        raise ValueError(f"transformer LM expects (b, T) tokens, got {x.shape}")
      # Flax's default embedding scale (std 1 / sqrt(d_model)), drawn flat.
      h = nn.Embed(self.num_classes, self.d_model, name="embed",
                   embedding_init=lambda k, s, d: draws.normal(k, s, d)
                   / s[1] ** 0.5)(x)
    else:
      b, H, W, C = x.shape
      p = self.patch_size
      x = x.reshape(b, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
      x = x.reshape(b, (H // p) * (W // p), p * p * C)
      h = Dense(self.d_model, name="embed")(x)
    T = h.shape[1]
    if T > self.max_len:
      raise ValueError(f"transformer: sequence of {T} positions exceeds "
                       f"model.max_len={self.max_len}")
    pos = self.param("pos_embed", lambda k, s: 0.02 * draws.normal(k, s),
                     (self.max_len, self.d_model))
    h = h + pos[None, :T]
    for i in range(self.num_layers):
      h = Block(self.d_model, self.num_heads, self.mlp_dim, self.is_lm,
                self.policy, f"block{i}", name=f"block{i}")(h)
    h = nn.LayerNorm(name="ln_f")(h)
    if not self.is_lm:
      h = h.mean(axis=1)
    return Dense(self.num_classes, name="head")(h)


def make(model_cfg, *, num_classes: int, input_shape: tuple, policy) -> Transformer:
  """Transformer for input_shape (T,) (LM) or (h, w, c) (ViT).

  Raises:
    ValueError: d_model not divisible by num_heads, image sides not divisible
      by patch_size, or a sequence / patch count above max_len.
  """
  d, heads = int(model_cfg.d_model), int(model_cfg.num_heads)
  if d % heads:
    raise ValueError(f"model.d_model={d} must be divisible by "
                     f"model.num_heads={heads}")
  if len(input_shape) == 1:
    is_lm, T = True, input_shape[0]
  elif len(input_shape) == 3:
    is_lm, p = False, int(model_cfg.patch_size)
    if input_shape[0] % p or input_shape[1] % p:
      raise ValueError(f"image sides {input_shape[:2]} must be divisible by "
                       f"model.patch_size={p}")
    T = (input_shape[0] // p) * (input_shape[1] // p)
  else:
    raise ValueError(f"transformer takes (T,) tokens or (h, w, c) images, got "
                     f"input_shape={input_shape}")
  if T > model_cfg.max_len:
    raise ValueError(f"transformer: {T} positions exceed model.max_len="
                     f"{model_cfg.max_len}")
  return Transformer(num_classes=num_classes, is_lm=is_lm, policy=policy,
                     d_model=d, num_heads=heads, num_layers=int(model_cfg.num_layers),
                     mlp_dim=int(model_cfg.mlp_dim), patch_size=int(model_cfg.patch_size),
                     max_len=int(model_cfg.max_len))
