"""lrtrain: low-rank training dynamics in JAX."""

import os

# jax's CPU QR/SVD/eigh kernels call into scipy's OpenBLAS, which is loaded
# lazily at the first factorization. Its worker threads spin against XLA's
# own thread pool; on a few cores that made a 1024 x 256 QR 15-50x slower
# (measured: 154 ms threaded vs 11 ms single-threaded on 2 cores). The
# integrators factorize small matrices every step, so default to one thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# XLA's CPU backend hands convolutions to YNNPACK by default (the
# "individual_convolution" library fusion). On LeNet5's convolutions and
# their gradients that ran the dense step at 35.5 ms where XLA's own
# (Eigen) convolutions take 19-20 ms (batch 128, 2 cores; the results agree
# to float32 rounding); dot fusions stay on YNNPACK. The flag must be in
# XLA_FLAGS before jax creates its CPU client, i.e. before the first jax
# computation of the process; a run that sets the flag itself, or
# LRTRAIN_YNN_CONV=1, keeps XLA's choice. Only jaxlib releases that know the
# flag get it (an unknown flag would stop XLA).
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,individual_dot"


def jaxlib_release() -> tuple[int, ...] | None:
  """(major, minor) of the installed jaxlib, read without importing it;
  None where it is not installed. XLA flags are tied to a release: XLA
  stops at a flag it does not know."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None
  return tuple(int(v) for v in version.split(".")[:2] if v.isdigit())


YNN_FLAG_KNOWN = jaxlib_release() == (0, 10)
if ("ynn_fusion_type" not in os.environ.get("XLA_FLAGS", "")
    and os.environ.get("LRTRAIN_YNN_CONV") != "1" and YNN_FLAG_KNOWN):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + YNN_FLAG).strip()

# XLA's CPU client allocates a step's buffers with malloc, from its worker
# threads' arenas. With glibc's defaults an arena gives its free top back to
# the kernel and hands requests its top cannot hold to mmap (one buffer holds
# all of a program's temporaries: 56 MB in adaptive KLS's step at n = 4096,
# r = 64), so every step faults its buffers in afresh: 10,700-14,400 page
# faults and 23-35 ms of kernel time in GeoLoRA's and adaptive KLS's 80 ms
# steps there. A 64 MiB top pad (a thread arena's whole heap), a 1 GiB trim
# threshold and no mmap for requests an arena can hold keep the pages (about
# 50-1,000 faults per step); only requests above an arena's 64 MiB still get
# their own mapping (the dense step's temporaries at n = 4096). Arenas take
# the pad when they are created, so it is set here, before jax starts its
# CPU threads; a process that sets glibc's malloc variables itself
# (MALLOC_* or GLIBC_TUNABLES), or LRTRAIN_MALLOC=0, keeps glibc's choice.
MALLOC_OPTIONS = ((-2, 64 << 20), (-1, 1 << 30), (-4, 0))
# (mallopt's M_TOP_PAD, M_TRIM_THRESHOLD, M_MMAP_MAX)


def _keep_pages() -> bool:
  """Sets `MALLOC_OPTIONS` where glibc is the allocator and nothing has
  chosen otherwise; whether it did."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if (os.environ.get("LRTRAIN_MALLOC") == "0" or "GLIBC_TUNABLES" in os.environ
      or any(k.startswith("MALLOC_") for k in os.environ)
      or not sys.platform.startswith("linux")):
    return False
  jax_bridge = sys.modules.get("jax._src.xla_bridge")
  if jax_bridge is not None and getattr(
      jax_bridge, "backends_are_initialized", lambda: False)():
    return False                        # the arenas exist: too late
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):     # musl and other C libraries
    return False
  return all(mallopt(k, v) == 1 for k, v in MALLOC_OPTIONS)


MALLOC_SET = _keep_pages()

# Factorizations go through `lrtrain.lapack`, which keeps batched (vmapped)
# ones from deadlocking jaxlib's CPU kernels (see there).

__version__ = "0.1.0"
