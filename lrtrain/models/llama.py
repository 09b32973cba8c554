"""A LLaMA-style causal decoder with factorizable projections.

Pre-norm blocks x + attn(rms(x)), x + mlp(rms(x)) with RMSNorm, rotary
position embeddings on queries and keys, a SwiGLU MLP
down(silu(gate(x)) * up(x)), causal multi-head attention, no biases, a
final RMSNorm and a linear head (or the transposed token embedding with
`model.tie_embeddings`).

Factorizable layers (kernels per `policy`): 'block{i}/attn/{q,k,v,o}' and
'block{i}/mlp/{gate,up,down}'; 'head' too, kept dense by the default
model.dense_layers. The embedding ('embed') and the norms are plain arrays.

Rotary embeddings rotate the pairs (x_j, x_{j + k/2}) of each head vector
(the "rotate half" layout) by the angle t * theta^(-2j / k) at position t,
so the score q_m . k_n depends on the positions only through m - n.

Axis legend: b = batch, T = tokens, d = d_model, h = heads, k = d / h (head
width), f = mlp_dim, V = vocabulary.

References:
  Touvron et al., "LLaMA: Open and efficient foundation language models",
    arXiv:2302.13971, 2023;
  Su et al., "RoFormer: Enhanced transformer with rotary position
    embedding", Neurocomputing 2024 (arXiv:2104.09864);
  Shazeer, "GLU variants improve transformer", arXiv:2002.05202, 2020;
  Zhang and Sennrich, "Root mean square layer normalization", NeurIPS 2019;
  Zhao et al., "GaLore: Memory-efficient LLM training by gradient low-rank
    projection", ICML 2024 (the 60M / 130M shapes of configs/llama_lm.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrtrain import draws
from lrtrain.layers import Dense, attention

NORM_EPS = 1e-6        # RMSNorm's epsilon inside the square root


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * scale over the last axis (float32 inside)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a learned per-feature 'scale' (init 1), no bias."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale)


def rotary(x_bthk: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """x rotated by its positions (module docstring).

  Args:
    x_bthk: (b, T, h, k) query or key vectors, k even.
    positions: (T,) integer positions.
    theta: the base of the rotation frequencies.

  Returns:
    An array like x_bthk.
  """
  k = x_bthk.shape[-1]
  freq = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
  angle = positions.astype(jnp.float32)[:, None] * freq[None, :]    # (T, k/2)
  cos = jnp.cos(angle)[None, :, None, :]
  sin = jnp.sin(angle)[None, :, None, :]
  x1, x2 = jnp.split(x_bthk.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x_bthk.dtype)


class Attention(nn.Module):
  """Causal multi-head attention with rotary q/k and factorizable q, k, v, o."""
  num_heads: int
  rope_theta: float
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    b, T, d = x_btd.shape
    h = self.num_heads
    k = d // h
    proj = lambda name: Dense(d, factor=self.policy.spec(f"{self.prefix}/{name}"),
                              use_bias=False, name=name)
    pos = jnp.arange(T)
    q = rotary(proj("q")(x_btd).reshape(b, T, h, k), pos, self.rope_theta)
    kk = rotary(proj("k")(x_btd).reshape(b, T, h, k), pos, self.rope_theta)
    v = proj("v")(x_btd).reshape(b, T, h, k)
    return proj("o")(attention(q, kk, v, causal=True))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)), each kernel factorizable."""
  mlp_dim: int
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, name: Dense(n, factor=self.policy.spec(f"{self.prefix}/{name}"),
                                  use_bias=False, name=name)
    y = nn.silu(dense(self.mlp_dim, "gate")(x)) * dense(self.mlp_dim, "up")(x)
    return dense(x.shape[-1], "down")(y)


class Block(nn.Module):
  """x + attn(attn_norm(x)); x + mlp(mlp_norm(x))."""
  num_heads: int
  mlp_dim: int
  rope_theta: float
  policy: object
  prefix: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + Attention(self.num_heads, self.rope_theta, self.policy,
                      f"{self.prefix}/attn", name="attn")(RMSNorm(name="attn_norm")(x))
    y = RMSNorm(name="mlp_norm")(x)
    return x + SwiGLU(self.mlp_dim, self.policy, f"{self.prefix}/mlp", name="mlp")(y)


class Llama(nn.Module):
  """(b, T) int tokens -> (b, T, V) next-token logits.

  Attributes:
    vocab_size: V.
    policy: models.FactorPolicy.
    d_model, num_heads, num_layers, mlp_dim: sizes.
    max_len: the longest sequence accepted.
    tie_embeddings: logits from the transposed embedding (no 'head').
    rope_theta: base of the rotary frequencies.
  """
  vocab_size: int
  policy: object
  d_model: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_dim: int = 176
  max_len: int = 128
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  is_lm = True                 # token inputs (models.init_params)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    if x.ndim != 2:
      raise ValueError(f"llama expects (b, T) tokens, got shape {x.shape}")
    if x.shape[1] > self.max_len:
      raise ValueError(f"llama: sequence of {x.shape[1]} positions exceeds "
                       f"model.max_len={self.max_len}")
    # Entries of std 1 / sqrt(d): tied logits h E^T of unit-RMS h have std 1.
    embed = nn.Embed(self.vocab_size, self.d_model, name="embed",
                     embedding_init=lambda k, s, d: draws.normal(k, s, d)
                     / s[1] ** 0.5)
    h = embed(x)
    for i in range(self.num_layers):
      h = Block(self.num_heads, self.mlp_dim, self.rope_theta, self.policy,
                f"block{i}", name=f"block{i}")(h)
    h = RMSNorm(name="norm")(h)
    if self.tie_embeddings:
      return embed.attend(h)
    return Dense(self.vocab_size, factor=self.policy.spec("head"),
                 use_bias=False, name="head")(h)


def num_params(*, vocab_size: int, d_model: int, num_layers: int, mlp_dim: int,
               tie_embeddings: bool = False) -> int:
  """The dense model's parameter count: embedding V d, per block 4 d^2
  (attention) + 3 d f (SwiGLU) + 2 d (norms), the final norm d, and the
  head d V unless tied."""
  d, f, V = d_model, mlp_dim, vocab_size
  per_block = 4 * d * d + 3 * d * f + 2 * d
  return V * d + num_layers * per_block + d + (0 if tie_embeddings else d * V)


def check_input(input_shape: tuple) -> None:
  """Raises ValueError unless input_shape is (T,) (a token sequence)."""
  if len(input_shape) != 1:
    raise ValueError(f"model.name='llama' takes (T,) token sequences (an lm "
                     f"dataset such as data.name='text'), got input_shape="
                     f"{input_shape}")


def make(model_cfg, *, num_classes: int, input_shape: tuple, policy) -> Llama:
  """The Llama of model_cfg for (T,) token inputs over num_classes tokens.

  Raises:
    ValueError: a non-sequence input, d_model not divisible by num_heads, an
      odd head width (rotary pairs), or T above model.max_len.
  """
  check_input(input_shape)
  d, heads = int(model_cfg.d_model), int(model_cfg.num_heads)
  if d % heads:
    raise ValueError(f"model.d_model={d} must be divisible by "
                     f"model.num_heads={heads}")
  if (d // heads) % 2:
    raise ValueError(f"llama: head width model.d_model / model.num_heads = "
                     f"{d // heads} must be even (rotary embeddings rotate pairs)")
  if input_shape[0] > model_cfg.max_len:
    raise ValueError(f"llama: {input_shape[0]} positions exceed model.max_len="
                     f"{model_cfg.max_len}")
  return Llama(vocab_size=num_classes, policy=policy, d_model=d, num_heads=heads,
               num_layers=int(model_cfg.num_layers), mlp_dim=int(model_cfg.mlp_dim),
               max_len=int(model_cfg.max_len),
               tie_embeddings=bool(model_cfg.tie_embeddings),
               rope_theta=float(model_cfg.rope_theta))
