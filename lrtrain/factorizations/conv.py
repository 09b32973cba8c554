"""2-D convolution helpers shared by dense and factored conv layers (NHWC).

`im2col` builds patches by stacking kh * kw shifted slices; its last axis is
ordered (kh, kw, c_in), matching a Flax kernel (kh, kw, c_in, c_out) reshaped
to (kh * kw * c_in, c_out). On the CPU this slice-based formulation is faster
than lax.conv_general_dilated for small kernels (see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

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
           padding: Padding = "VALID", impl: str = "im2col") -> jax.Array:
  """NHWC convolution with a (kh, kw, c_in, c_out) kernel.

  Args:
    impl: "im2col" (slices + one matmul) or "xla" (lax.conv_general_dilated).
  """
  kh, kw, c_in, c_out = kernel.shape
  if x.shape[-1] != c_in:
    raise ValueError(f"conv: input has {x.shape[-1]} channels, kernel expects {c_in}")
  if impl == "im2col":
    return im2col(x, kh, kw, strides, padding) @ kernel.reshape(-1, c_out)
  if impl == "xla":
    pads = _pads(x.shape[1], x.shape[2], kh, kw, strides, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, tuple(strides), pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  raise ValueError(f"conv impl must be 'im2col' or 'xla', got {impl!r}")
