"""lrtrain: low-rank training dynamics in JAX."""

import os

# jax's CPU QR/SVD/eigh kernels call into scipy's OpenBLAS, which is loaded
# lazily at the first factorization. Its worker threads spin against XLA's
# own thread pool; on a few cores that made a 1024 x 256 QR 15-50x slower
# (measured: 154 ms threaded vs 11 ms single-threaded on 2 cores). The
# integrators factorize small matrices every step, so default to one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Factorizations go through `lrtrain.lapack`, which keeps batched (vmapped)
# ones from deadlocking jaxlib's CPU kernels (see there).

__version__ = "0.1.0"
