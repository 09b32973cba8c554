"""Flax (linen) Dense and Conv layers whose kernel is any factorization.

A layer's 'kernel' param is either a dense array (Flax layout: (in, out) for
Dense, (kh, kw, c_in, c_out) for Conv) or a factorization node from
`lrtrain.factorizations` (LowRank / Lora / SLTrain in (out, in)
orientation, Tucker for conv kernels). Linen params may be arbitrary
pytrees, so the node is the param value itself: integrators, checkpoints
and vmap see plain pytrees and find the nodes with
`factorizations.is_factor`, without Flax.

Axis legend: b = batch, m = in features, n = out features, r = rank,
kh/kw = kernel height/width.

Initialisation of factor nodes matches the default dense init
(lecun_normal: Var(W_ij) = 1 / fan_in):
  'random': orthonormal U, V and singular values scaled by sqrt(n / r), so
    E||W||_F^2 = n as for the dense init and a unit-variance input gives
    unit-variance outputs on average;
  'svd': truncated SVD (HOSVD for Tucker) of a dense lecun_normal draw.
Lora nodes freeze a dense lecun_normal draw as W0 (the base a fine-tuning
run replaces by pretrained weights) with B = 0. SLTrain nodes start as the
paper's (`factorizations.sltrain`: B = 0, A and the sparse values uniform
on +-1/sqrt(m)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrtrain import draws
from lrtrain import factorizations as fz
from lrtrain.factorizations import conv as conv_lib
from lrtrain.factorizations import lora, lowrank, sltrain, tucker

KINDS = ("dense", "lowrank", "lora", "sltrain", "tucker")
INITS = ("random", "flat", "svd")


@dataclasses.dataclass(frozen=True)
class FactorSpec:
  """How one layer's kernel is factorized (hashable: a module attribute).

  Attributes:
    kind: 'dense' | 'lowrank' | 'lora' | 'sltrain' | 'tucker' (conv only).
    rank: LowRank / Lora / SLTrain rank r.
    clip_rank: cap `rank` at floor(min(n, m) / 2) per layer (the default
      r_max of the rank-adaptive integrators), and each Tucker channel rank
      at half its channel count (at least 1), instead of rejecting a rank
      too large for a layer; one request then fits every layer.
    capacity: LowRank buffer columns (0 = rank; capped at min(n, m)).
    tucker_ranks: (r_out, r_in) channel ranks of a Tucker kernel; the spatial
      modes stay full.
    alpha: Lora / SLTrain scale numerator (0 = rank, i.e. scale 1).
    rank_stabilised: Lora / SLTrain scale alpha / sqrt(r) (rsLoRA) instead
      of alpha / r.
    init: 'random', 'flat' or 'svd' (see `matrix_node`).
    sparse_density: SLTrain support size as a fraction of the n m entries.
  """
  kind: str = "lowrank"
  rank: int = 16
  clip_rank: bool = False
  capacity: int = 0
  tucker_ranks: tuple[int, int] = (8, 8)
  alpha: float = 0.0
  rank_stabilised: bool = False
  init: str = "random"
  sparse_density: float = sltrain.DEFAULT_DENSITY

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown factor kind {self.kind!r}; valid: {', '.join(KINDS)}")
    if self.init not in INITS:
      raise ValueError(f"unknown factor init {self.init!r}; valid: {', '.join(INITS)}")


def _layer_name(module: nn.Module) -> str:
  path = module.scope.path if module.scope is not None else ()
  return "/".join(str(p) for p in path) or module.name or type(module).__name__


def _clipped(r: int, d: int) -> int:
  """FactorSpec.clip_rank: r capped at half of d (at least 1)."""
  return min(r, max(1, d // 2))


def _check_matrix_rank(name: str, spec: FactorSpec, n: int, m: int) -> int:
  """Capacity of a LowRank/Lora (n, m) kernel; ValueError naming the layer."""
  if not 1 <= spec.rank <= min(n, m):  # the caller has applied clip_rank
    raise ValueError(
        f"layer '{name}': rank {spec.rank} must be in [1, min(n, m)] = "
        f"[1, {min(n, m)}] for its ({n}, {m}) weight; lower model.factor.rank "
        f"or add '{name}' to model.dense_layers")
  cap = spec.capacity or spec.rank
  return max(spec.rank, min(cap, min(n, m)))


def matrix_node(key: jax.Array, spec: FactorSpec, n: int, m: int, *, name: str,
                fan_in: int | None = None, dtype=jnp.float32):
  """A LowRank, Lora or SLTrain node for an (n, m) = (out, in) weight.

  Args:
    key: PRNG key.
    spec: the layer's FactorSpec (kind 'lowrank', 'lora' or 'sltrain').
    n: out features.
    m: in features (kh * kw * c_in for a conv).
    name: layer path, for error messages.
    fan_in: fan-in of the dense init (defaults to m).
    dtype: param dtype.

  Returns:
    The factorization node.

  Raises:
    ValueError: rank outside [1, min(n, m)] (the message names the layer).
  """
  if spec.clip_rank:
    spec = dataclasses.replace(spec, rank=_clipped(spec.rank, min(n, m)))
  capacity = _check_matrix_rank(name, spec, n, m)
  fan_in = m if fan_in is None else fan_in
  kd, kf = jax.random.split(key)
  alpha = spec.alpha if spec.alpha > 0 else None
  if spec.kind == "sltrain":
    return sltrain.init(kf, n, m, spec.rank, density=spec.sparse_density,
                        alpha=alpha, rank_stabilised=spec.rank_stabilised,
                        dtype=dtype)
  # Dense lecun_normal draw in (out, in) orientation, std 1 / sqrt(fan_in).
  W = draws.lecun_normal(kd, (n, m), dtype, fan_in=fan_in)
  if spec.kind == "lora":
    return lora.init(kf, W, spec.rank, alpha=alpha,
                     rank_stabilised=spec.rank_stabilised)
  if spec.kind != "lowrank":
    raise ValueError(f"layer '{name}': factor kind {spec.kind!r} is not a "
                     "matrix factorization (use 'lowrank', 'lora' or "
                     "'sltrain')")
  if spec.init == "svd":
    return lowrank.from_dense(W, spec.rank, capacity=capacity)
  # E s_i^2 = 1 for the |N(0,1)| singular values, so scale^2 r = n * m / fan_in
  # gives E||W||_F^2 = n m / fan_in, the dense init's value.
  scale = math.sqrt(n * m / (fan_in * spec.rank))
  return lowrank.init(kf, n, m, spec.rank, capacity=capacity, scale=scale,
                      spectrum="flat" if spec.init == "flat" else "halfnormal",
                      dtype=dtype)


class Dense(nn.Module):
  """y = x W^T + b with W dense or factorized.

  Attributes:
    features: n, the output width.
    factor: FactorSpec, or None / kind 'dense' for a plain (m, n) kernel.
    use_bias: add a bias of shape (n,).
    dtype: param dtype.
  """
  features: int
  factor: FactorSpec | None = None
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    m, n = x.shape[-1], self.features
    spec = self.factor
    if spec is None or spec.kind == "dense":
      kernel = self.param("kernel", draws.lecun_normal, (m, n), self.dtype)
      y = x @ kernel
    else:
      if spec.kind == "tucker":
        raise ValueError(f"layer '{_layer_name(self)}': Tucker factors only "
                         "apply to conv kernels")
      name = _layer_name(self)
      kernel = _factor_param(
          self, lambda k: matrix_node(k, spec, n, m, name=name, dtype=self.dtype))
      if kernel.shape != (n, m):
        raise ValueError(f"layer '{name}': factor shape {kernel.shape} does not "
                         f"match (out, in) = ({n}, {m})")
      y = fz.apply(kernel, x)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (n,), self.dtype)
    return y


def _factor_param(module: nn.Module, init):
  """The 'kernel' factor node; an existing one is taken as is, since
  rank-adaptive integrators move its capacity (a shape flax's param check
  would reject)."""
  if module.has_variable("params", "kernel"):
    return module.get_variable("params", "kernel")
  return module.param("kernel", init)


class Conv(nn.Module):
  """NHWC 2-D convolution with a dense or factorized kernel.

  Dense kernels are (kh, kw, c_in, c_out); LowRank, Lora and SLTrain
  kernels factor the (c_out, kh * kw * c_in) matrix: with the 'xla'
  routine a LowRank kernel whose factors are cheaper to convolve with
  (`lowrank.convolve_through_factors`) runs as a convolution with V's
  filters and a channel mix by S^T U^T, any other kernel is formed and run
  through lax.conv_general_dilated; with 'im2col' the factors are applied to
  the patches in sequence; Tucker
  kernels go through `tucker.conv` (channel projections around a small
  core convolution).

  Attributes:
    features: c_out.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'VALID', 'SAME' or explicit pairs.
    factor: FactorSpec or None (dense).
    impl: 'auto', 'im2col' or 'xla' (the convolution routine,
      `conv_lib.resolve`).
    use_bias: add a bias of shape (c_out,).
    dtype: param dtype.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = "SAME"
  factor: FactorSpec | None = None
  impl: str = "auto"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"layer '{_layer_name(self)}': Conv expects NHWC input, "
                       f"got shape {x.shape}")
    kh, kw = self.kernel_size
    c_in, c_out = x.shape[-1], self.features
    strides, padding = tuple(self.strides), self.padding
    spec = self.factor
    name = _layer_name(self)
    fan_in = kh * kw * c_in
    if spec is None or spec.kind == "dense":
      kernel = self.param("kernel", draws.lecun_normal, (kh, kw, c_in, c_out), self.dtype)
      y = conv_lib.conv2d(x, kernel, strides, padding, self.impl)
    elif spec.kind == "tucker":
      kernel = _factor_param(self, lambda k: _tucker_node(
          k, spec, c_out, c_in, kh, kw, name=name, dtype=self.dtype))
      y = tucker.conv(kernel, x, strides, padding, self.impl)
    else:
      kernel = _factor_param(self, lambda k: matrix_node(
          k, spec, c_out, fan_in, name=name, dtype=self.dtype))
      if conv_lib.resolve(self.impl) == "xla":
        if lowrank.convolve_through_factors(kernel):
          # V's C filters, then the channel mix S^T U^T.
          v = lowrank.matrix_to_conv_kernel(kernel.V.T, kh, kw)
          y = lowrank.mix(kernel, conv_lib.conv2d(x, v, strides, padding,
                                                  "xla"))
        else:
          # One convolution with the formed kernel: kernel-sized work, where
          # patches cost b h' w' kh kw c_in per layer.
          w = lowrank.matrix_to_conv_kernel(fz.materialize(kernel), kh, kw)
          y = conv_lib.conv2d(x, w, strides, padding, "xla")
      else:
        y = fz.apply(kernel, conv_lib.im2col(x, kh, kw, strides, padding))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (c_out,), self.dtype)
    return y


class ImageClassifier(nn.Module):
  """Fields of the convolutional classifiers (LeNet5, VGG): the number of
  classes, the factor policy choosing each layer's kernel
  (models.FactorPolicy) and the convolution routine (`Conv`'s impl)."""
  num_classes: int
  policy: object
  impl: str = "auto"


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 (NHWC; odd trailing rows/cols dropped).

  Written as a reshape and a max rather than lax.reduce_window: on the CPU
  the reduce_window gradient (select-and-scatter) measured 5.7x slower for
  a (128, 24, 24, 20) LeNet5 activation (45 ms vs 8 ms, forward + backward).
  """
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def attention(q_bthk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array,
              causal: bool) -> jax.Array:
  """Scaled dot-product attention over heads: (b, T, h, k) queries, (b, S,
  h, k) keys and values -> (b, T, h * k). Scores and softmax in float32;
  causal: query t sees keys s <= t."""
  b, T, h, k = q_bthk.shape
  logits = jnp.einsum("bqhk,bshk->bhqs", q_bthk, k_bshk).astype(jnp.float32)
  logits = logits / jnp.sqrt(jnp.float32(k))
  if causal:
    mask = jnp.tril(jnp.ones((T, k_bshk.shape[1]), bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  w = jax.nn.softmax(logits, axis=-1).astype(v_bshk.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", w, v_bshk).reshape(b, T, h * k)


def _tucker_node(key, spec: FactorSpec, c_out: int, c_in: int, kh: int, kw: int,
                 *, name: str, dtype=jnp.float32) -> fz.Tucker:
  """Tucker kernel with channel ranks spec.tucker_ranks, full spatial modes
  (with spec.clip_rank each capped at half its channel count, at least 1)."""
  r_out, r_in = spec.tucker_ranks
  if spec.clip_rank:
    r_out, r_in = _clipped(r_out, c_out), _clipped(r_in, c_in)
  for what, r, d in (("r_out", r_out, c_out), ("r_in", r_in, c_in)):
    if not 1 <= r <= d:
      raise ValueError(
          f"layer '{name}': Tucker {what} = {r} must be in [1, {d}] for a "
          f"({c_out}, {c_in}, {kh}, {kw}) kernel; lower model.factor.tucker_ranks "
          f"or add '{name}' to model.dense_layers")
  ranks = (r_out, r_in, kh, kw)
  kd, kf = jax.random.split(key)
  if spec.init == "svd":
    W = draws.lecun_normal(kd, (kh, kw, c_in, c_out), jnp.float32)
    return tucker.from_dense(W, ranks)
  node = tucker.init(kf, c_out, c_in, kh, kw, ranks, dtype=dtype)
  # Rescale the core so ||C||_F^2 equals the dense init's expectation
  # c_out * c_in * kh * kw / fan_in = c_out (the factors are orthonormal, so
  # ||C||_F = ||core||_F), as the 'random' LowRank init does.
  target = math.sqrt(c_out)
  norm = jnp.linalg.norm(node.core)
  core = node.core * (target / jnp.maximum(norm, 1e-12))
  return dataclasses.replace(node, core=core.astype(dtype))
