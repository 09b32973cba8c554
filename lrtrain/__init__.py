"""lrtrain: low-rank training dynamics in JAX."""

import os

# jax's CPU QR/SVD/eigh kernels call into scipy's OpenBLAS, which is loaded
# lazily at the first factorization. Its worker threads spin against XLA's
# own thread pool; on a few cores that made a 1024 x 256 QR 15-50x slower
# (measured: 154 ms threaded vs 11 ms single-threaded on 2 cores). The
# integrators factorize small matrices every step, so default to one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# XLA's CPU runtime (jaxlib 0.10.2) deadlocks, every thread idle, on some
# programs with several independent LAPACK custom calls when its
# concurrency-optimized scheduler runs them side by side: a step of
# rank-adaptive KLS vmapped over 4 or more seeds never returned. The
# default scheduler order runs them fine (measured: 16 seeds, 300 steps).
# Appended unless the user chose a value; read when the backend starts.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=false").strip()

__version__ = "0.1.0"
