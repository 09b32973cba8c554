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


def _jaxlib_knows_ynn_flag() -> bool:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return False
  major_minor = tuple(int(v) for v in version.split(".")[:2] if v.isdigit())
  return major_minor == (0, 10)


YNN_FLAG_KNOWN = _jaxlib_knows_ynn_flag()
if ("ynn_fusion_type" not in os.environ.get("XLA_FLAGS", "")
    and os.environ.get("LRTRAIN_YNN_CONV") != "1" and YNN_FLAG_KNOWN):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                             + YNN_FLAG).strip()

# Factorizations go through `lrtrain.lapack`, which keeps batched (vmapped)
# ones from deadlocking jaxlib's CPU kernels (see there).

__version__ = "0.1.0"
