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
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

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


def im2col(x: jax.Array, kh: int, kw: int, strides=(1, 1),
           padding: Padding = "VALID") -> jax.Array:
  """(b, h, w, c) -> (b, h', w', kh * kw * c) patches, (kh, kw, c) ordered."""
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = _pads(h, w, kh, kw, strides, padding)
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = x.shape[1], x.shape[2]
  ho = (hp - kh) // strides[0] + 1
  wo = (wp - kw) // strides[1] + 1
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
      (lax.conv_general_dilated).
  """
  kh, kw, c_in, c_out = kernel.shape
  if x.shape[-1] != c_in:
    raise ValueError(f"conv: input has {x.shape[-1]} channels, kernel expects {c_in}")
  if resolve(impl) == "im2col":
    return im2col(x, kh, kw, strides, padding) @ kernel.reshape(-1, c_out)
  pads = _pads(x.shape[1], x.shape[2], kh, kw, strides, padding)
  return jax.lax.conv_general_dilated(
      x, kernel, tuple(strides), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
