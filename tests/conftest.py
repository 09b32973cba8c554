"""Suite-wide settings: JAX's persistent compilation cache, the Fashion-MNIST
marker and the generated stand-in for it.

Compilation cache: every compiled program (jitted steps and the many small
eager ops) is stored in `.jax_cache/` at the repository root (override with
LRTRAIN_TEST_JAX_CACHE). Set through the environment before jax starts, so
the pytest-xdist workers and the subprocesses the tests launch share it;
identical programs compiled by different tests are compiled once per run,
and a second run of the suite starts warm.

Markers (pyproject.toml):
  fashion_mnist  reads Fashion-MNIST from Debian's dataset-fashion-mnist;
                 skipped, with one reason line, where it is not installed.
  tier2          end-to-end studies and long regressions; deselected by the
                 default command (addopts), run by `python -m pytest -m tier2`.
"""

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE = os.environ.get("LRTRAIN_TEST_JAX_CACHE") or os.path.join(ROOT, ".jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
# Cache every program: most are small and compile in well under a second,
# but the suite compiles thousands of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import lrtrain  # pylint: disable=g-import-not-at-top,wrong-import-position

# The suite compiles about as long as it runs: LLVM's optimization passes
# and XLA's MLIR fusion emitters dominate the compilation of its many small
# programs, and they buy the tests nothing (cold cache, 2 cores: 860 s with
# XLA's defaults, 651 s at optimization level 0, 485 s also without the
# fusion emitters). Programs compiled this way compute the same operations;
# the benchmarks and training runs keep XLA's defaults. Set for the jaxlib
# release they were measured with (XLA stops at a flag it does not know);
# LRTRAIN_TEST_XLA_FLAGS replaces them ('' for none).
TEST_XLA_FLAGS = os.environ.get(
    "LRTRAIN_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    if lrtrain.jaxlib_release() == (0, 10) else "")
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS) if f)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

from lrtrain import data  # pylint: disable=g-import-not-at-top,wrong-import-position

FASHION_MNIST_MISSING = ("Fashion-MNIST not installed: apt-get install "
                         "dataset-fashion-mnist")


def fashion_mnist_installed() -> bool:
  """Debian's dataset-fashion-mnist is present (the loader finds its files)."""
  return data._find_idx(data.FASHION_MNIST_DEB_DIR,  # pylint: disable=protected-access
                        data.IDX_FILES["train_x"]) is not None


def pytest_runtest_setup(item):
  # Raised here (not as a skipif mark) so that every such skip shares one
  # location and `-rs` prints one line for all of them.
  if item.get_closest_marker("fashion_mnist") and not fashion_mnist_installed():
    pytest.skip(FASHION_MNIST_MISSING)


def write_generated_fashion_mnist(directory: str, num_train: int = 640,
                                  num_test: int = 128, seed: int = 0) -> str:
  """Four Fashion-MNIST-shaped IDX files (28x28 uint8, 10 classes) in
  `directory`: each class is a noisy bright bar at its own position, so the
  files go through the same reader, shapes and models as the real data."""
  rng = np.random.default_rng(seed)

  def images(n):
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, 28, 28))
    for i, k in enumerate(y):
      x[i, 2 + 2 * k:5 + 2 * k, 4:24] += 150
    return x.astype(np.uint8), y.astype(np.uint8)

  os.makedirs(directory, exist_ok=True)
  tx, ty = images(num_train)
  vx, vy = images(num_test)
  for key, a in (("train_x", tx), ("train_y", ty), ("test_x", vx), ("test_y", vy)):
    data.write_idx(os.path.join(directory, data.IDX_FILES[key] + ".gz"), a)
  return directory


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
  """The directory Fashion-MNIST configs read in smoke runs: "" (the Debian
  package, as configured) where it is installed, else generated IDX files
  of the same shapes."""
  if fashion_mnist_installed():
    return ""
  return write_generated_fashion_mnist(str(tmp_path_factory.mktemp("fmnist_gen")))
