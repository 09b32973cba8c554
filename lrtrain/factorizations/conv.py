"""2-D convolution helpers shared by dense and factored conv layers (NHWC).

Two routines compute a convolution:

  "xla"     lax.conv_general_dilated;
  "im2col"  patches built by stacking kh * kw shifted slices (last axis
            ordered (kh, kw, c_in), matching a Flax kernel (kh, kw, c_in,
            c_out) reshaped to (kh * kw * c_in, c_out)), then one matmul.

"auto" (the layers' default) is "xla": with XLA's own CPU convolutions
(`import lrtrain` keeps them off YNNPACK, docs/design.md) it is the faster
routine on the CPU for dense and factored kernels alike, also under
jax.vmap over seeds, where the kernel's seed axis makes it a grouped
convolution (LeNet5, batch 128: rank-adaptive KLS 66 vs 94 ms per step
with im2col; 4 vmapped seeds, dense 118-120 vs 138-143 ms, rank-adaptive
KLS 355-375 vs 433-440 ms).

On the CPU, the "xla" routine of a small layer (`patch_input_gradient`)
keeps XLA's forward convolution and kernel gradient but takes its input
gradient through patches: its tangent in x is written as patches times the
kernel matrix (a custom JVP), whose transpose is one matmul and the
patches' shifted adds. Forward mode, vmap and higher derivatives go
through the same rule. LeNet5's dense step at batch 128: 0.85x.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from lrtrain import lapack
from lrtrain.factorizations import lowrank

IMPLS = ("auto", "im2col", "xla")


def resolve(impl: str) -> str:
  """The routine "auto" stands for; other names as they are."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  return "xla" if impl == "auto" else impl

Padding = str | Sequence[tuple[int, int]]


def _pads(h: int, w: int, kh: int, kw: int, strides, padding) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    padding = padding.upper()
    if padding == "VALID":
      return [(0, 0), (0, 0)]
    if padding == "SAME":
      out = []
      for size, k, s in ((h, kh, strides[0]), (w, kw, strides[1])):
        o = -(-size // s)
        total = max((o - 1) * s + k - size, 0)
        out.append((total // 2, total - total // 2))
      return out
    raise ValueError(f"unknown padding {padding!r}; use 'SAME', 'VALID' or pairs")
  return [tuple(p) for p in padding]


def _out_size(hp: int, wp: int, kh: int, kw: int, strides) -> tuple[int, int]:
  """(h', w') of a kh x kw window over an already padded hp x wp map."""
  return (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1


def im2col(x: jax.Array, kh: int, kw: int, strides=(1, 1),
           padding: Padding = "VALID") -> jax.Array:
  """(b, h, w, c) -> (b, h', w', kh * kw * c) patches, (kh, kw, c) ordered."""
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = _pads(h, w, kh, kw, strides, padding)
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = _out_size(x.shape[1], x.shape[2], kh, kw, strides)
  if ho < 1 or wo < 1:
    raise ValueError(f"conv: {kh}x{kw} kernel does not fit input {h}x{w}")
  cols = [x[:, i:i + (ho - 1) * strides[0] + 1:strides[0],
            j:j + (wo - 1) * strides[1] + 1:strides[1], :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def conv2d(x: jax.Array, kernel: jax.Array, strides=(1, 1),
           padding: Padding = "VALID", impl: str = "auto") -> jax.Array:
  """NHWC convolution with a (kh, kw, c_in, c_out) kernel.

  Args:
    impl: "auto", "im2col" (slices + one matmul) or "xla"
      (lax.conv_general_dilated; on the CPU its input gradient goes
      through patches where they are small, `patch_input_gradient`).
  """
  kh, kw, c_in, c_out = kernel.shape
  if x.shape[-1] != c_in:
    raise ValueError(f"conv: input has {x.shape[-1]} channels, kernel expects {c_in}")
  if resolve(impl) == "im2col":
    return im2col(x, kh, kw, strides, padding) @ kernel.reshape(-1, c_out)
  pads = tuple(map(tuple, _pads(x.shape[1], x.shape[2], kh, kw, strides, padding)))
  strides = tuple(strides)
  if patch_input_gradient(x.shape, kernel.shape, strides, pads):
    return _conv_patch_tangent(x, kernel, strides, pads)
  return _xla_conv(x, kernel, strides, pads)


def _xla_conv(x, kernel, strides, pads):
  return jax.lax.conv_general_dilated(
      x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Entries of the (b, h', w', kh kw c_in) patch gradient up to which the
# input gradient goes through patches on the CPU: 8 Mi, 32 MiB in float32,
# the last-level cache of the machine it was measured on. XLA's CPU
# convolution computes small input gradients at a third of its forward
# rate (LeNet5's conv2, (128, 12, 12, 20) by 5 x 5 x 20 x 50: forward 3.1
# ms, input gradient 9.6 ms; 2 cores), while one matmul dY W^T and the
# patches' transpose (shifted adds) take 4.3-4.7 ms. Measured (ms, XLA vs
# patches): patch gradients of 1.9-8.2 Mi entries 3.5 / 1.4, 9.6 / 4.7,
# 17.7 / 7.6, 12.7 / 8.4, 21.5 / 4.5 (a 3 x 3 SAME layer on 3 channels);
# from 9.2 Mi on XLA wins (9.1 / 9.9, 7.3 / 10.3, and 38 / 62 at 25.6 Mi,
# 54 / 170 at 72 Mi).
PATCH_GRAD_MAX = 8 * 2 ** 20


def patch_input_gradient(x_shape, kernel_shape, strides, pads) -> bool:
  """Whether `conv2d`'s "xla" routine takes its input gradient through
  patches: on the CPU, where the patch gradient has at most
  `PATCH_GRAD_MAX` entries."""
  b, h, w, _ = x_shape
  kh, kw, c_in, _ = kernel_shape
  ho, wo = _out_size(h + sum(pads[0]), w + sum(pads[1]), kh, kw, strides)
  return lapack.on_cpu() and b * ho * wo * kh * kw * c_in <= PATCH_GRAD_MAX


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_patch_tangent(x, kernel, strides, pads):
  """XLA's convolution whose tangent in x is patches times the kernel
  matrix, so that its transpose, the input gradient, is the matmul
  dY W^T followed by the patches' transpose."""
  return _xla_conv(x, kernel, strides, pads)


def _conv_patch_tangent_jvp(strides, pads, primals, tangents):
  x, kernel = primals
  dx, dk = tangents
  y = _xla_conv(x, kernel, strides, pads)
  kh, kw, _, c_out = kernel.shape
  parts = []
  if not isinstance(dx, SymbolicZero):
    parts.append(im2col(dx, kh, kw, strides, pads) @ kernel.reshape(-1, c_out))
  if not isinstance(dk, SymbolicZero):
    parts.append(_xla_conv(x, dk, strides, pads))
  return y, lowrank.sum_terms(parts, y)


_conv_patch_tangent.defjvp(_conv_patch_tangent_jvp, symbolic_zeros=True)
