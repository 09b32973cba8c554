"""Dense factorizations that never reach jaxlib's CPU kernels batched.

jaxlib 0.10.2's CPU LAPACK kernels (QR, Cholesky, triangular solve, SVD,
eigh) split a batched call over XLA's intra-op thread pool and then block a
pool thread until the pieces finish. When the program runs as many such
calls side by side as the pool has threads, every thread waits for work
queued behind it and the step never returns. `jax.vmap` of any step that
factorizes (every rank-adaptive integrator, several seeds at once) turns
each factorization into such a batched call.

The functions here take and return what their `jax.numpy.linalg` /
`jax.scipy.linalg` namesakes do, but on the CPU a batched input (leading
axes, or a `vmap` over the call) becomes one unbatched call per matrix:
side by side for up to `UNROLL` matrices (each runs in its own pool task
without blocking), in a sequential `lax.map` beyond. On other backends the
batched call runs as usual. Every factorization in lrtrain goes through
this module.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

UNROLL = 8


def on_cpu() -> bool:
  """Whether programs traced now target the CPU (the default backend)."""
  return jax.default_backend() == "cpu"


def _per_matrix(call: Callable, args, batch: int):
  """call(*args[i]) for each i < batch, stacked; args are batched arrays."""
  if batch <= UNROLL:
    outs = [call(*[a[i] for a in args]) for i in range(batch)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  return lax.map(lambda xs: call(*xs), tuple(args))


@functools.lru_cache(maxsize=None)
def _unbatched(name: str, core_ndims: tuple, **static) -> Callable:
  """`name`'s function with `static` options bound, batched over the axes in
  front of each argument's last core_ndims[i] axes one matrix at a time."""
  fn = functools.partial(_FUNCTIONS[name], **static)

  @jax.custom_batching.custom_vmap
  def call(*args):
    lead = jnp.broadcast_shapes(*[a.shape[:a.ndim - k]
                                  for a, k in zip(args, core_ndims)])
    if not lead or not on_cpu():
      return fn(*args)
    batch = 1
    for d in lead:
      batch *= d
    flat = [jnp.reshape(jnp.broadcast_to(a, lead + a.shape[a.ndim - k:]),
                        (batch,) + a.shape[a.ndim - k:])
            for a, k in zip(args, core_ndims)]
    out = _per_matrix(call, flat, batch)
    return jax.tree.map(lambda x: jnp.reshape(x, lead + x.shape[1:]), out)

  @call.def_vmap
  def rule(axis_size, in_batched, *args):
    args = [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, b in zip(args, in_batched)]
    if on_cpu():
      out = _per_matrix(call, args, axis_size)
    else:
      out = jax.vmap(fn)(*args)
    return out, jax.tree.map(lambda _: True, out)

  return call


def _svd_qr(a, full_matrices=True, compute_uv=True):
  return jax.lax.linalg.svd(a, full_matrices=full_matrices,
                            compute_uv=compute_uv,
                            algorithm=jax.lax.linalg.SvdAlgorithm.QR)


_FUNCTIONS = {
    "svd": jnp.linalg.svd,
    "svd_qr": _svd_qr,
    "qr": jnp.linalg.qr,
    "cholesky": jnp.linalg.cholesky,
    "eigh": jnp.linalg.eigh,
    "eigvalsh": jnp.linalg.eigvalsh,
    "solve_triangular": jax.scipy.linalg.solve_triangular,
}


def svd(a, full_matrices: bool = True, compute_uv: bool = True):
  return _unbatched("svd", (2,), full_matrices=full_matrices,
                    compute_uv=compute_uv)(a)


def svd_qr(a, full_matrices: bool = True, compute_uv: bool = True):
  """`svd` by the QR iteration (LAPACK's gesvd) instead of divide and
  conquer (gesdd): slower, for the rare matrix where gesdd fails."""
  return _unbatched("svd_qr", (2,), full_matrices=full_matrices,
                    compute_uv=compute_uv)(a)


def qr(a, mode: str = "reduced"):
  return _unbatched("qr", (2,), mode=mode)(a)


def cholesky(a):
  return _unbatched("cholesky", (2,))(a)


def eigh(a):
  return _unbatched("eigh", (2,))(a)


def eigvalsh(a):
  return _unbatched("eigvalsh", (2,))(a)


def solve_triangular(a, b, lower: bool = False):
  """Solves a x = b for a triangular `a` and a matrix `b`."""
  return _unbatched("solve_triangular", (2, 2), lower=lower)(a, b)
