"""2-D convolution helpers shared by dense and factored conv layers (NHWC).

Two routines compute a convolution:

  "xla"     lax.conv_general_dilated;
  "im2col"  patches built by stacking kh * kw shifted slices (last axis
            ordered (kh, kw, c_in), matching a Flax kernel (kh, kw, c_in,
            c_out) reshaped to (kh * kw * c_in, c_out)), then one matmul.

"auto" (the layers' default) is "xla", except in programs traced inside
`batched_kernels()`: there the kernel carries a vmapped (seed) axis, which
jax.vmap turns into a grouped convolution, and XLA's CPU backend runs that
2.3x slower than the batched matmuls of im2col (benchmarks/README.md). The
runner enters it for vmapped seeds. Elsewhere XLA's convolution is the
faster one on the CPU, for factored kernels too: rank-adaptive KLS on
LeNet5 (batch 128) takes 66 ms per step with it against 94 ms with
im2col (both one forward + backward pass, `integrators.kls`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp

IMPLS = ("auto", "im2col", "xla")
_im2col = [False]


@contextlib.contextmanager
def batched_kernels() -> Iterator[None]:
  """Inside this block "auto" convolutions are traced as im2col (read at
  trace time, like `linalg.implementation`)."""
  _im2col.append(True)
  try:
    yield
  finally:
    _im2col.pop()


def resolve(impl: str) -> str:
  """The routine "auto" stands for here; other names as they are."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "im2col" if _im2col[-1] else "xla"
  return impl

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
