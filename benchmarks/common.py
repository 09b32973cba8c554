"""Timing, compile counting and FLOP helpers shared by the benchmarks.

All timings are medians of per-step wall times after warm-up, with the
spread (min, max of the medians) over repeats; ratios are taken between
methods measured in the same process, one after another, so that the
machine's load drifts as little as possible between them.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def block(tree):
  """Wait for every array in a pytree."""
  for x in jax.tree.leaves(tree):
    if hasattr(x, "block_until_ready"):
      x.block_until_ready()
  return tree


def time_steps(step: Callable, carry, *, steps: int, warmup: int = 3,
               repeats: int = 3, budget_s: float | None = None,
               min_steps: int = 5, beside: dict | None = None,
               every: int = 5) -> dict:
  """Median ms/step of `carry = step(carry)` over `steps` steps, `repeats` times.

  Each step is timed individually (dispatch + wait), so the median ignores
  the occasional hiccup of a shared machine. With `budget_s`, a step that
  is slow (judged on the last warm-up step) is timed over fewer steps,
  max(min_steps, budget_s / t_step) per repeat, and one warm-up step is
  used after the compiling one; the count used is returned.

  With `beside` ({name: fn}, each fn() returning arrays), after every
  `every` steps each fn is called three times and timed: the median of
  those `every` steps and of each fn's three calls form one block, so a
  ratio to the step is taken at the speed the host had for both (a shared
  host's speed drifts by tens of percent within seconds).

  Returns:
    {"ms": median over repeats of the per-repeat medians, "ms_min", "ms_max",
     "steps": timed steps per repeat, "carry": the final carry}; with
    `beside` also "blocks": [(step ms, {name: fn ms}), ...].
  """
  carry = block(step(carry))            # compiles
  for fn in (beside or {}).values():
    block(fn())
  t_warm = 0.0
  for _ in range(max(warmup - 1, 1)):
    t0 = time.perf_counter()
    carry = block(step(carry))
    t_warm = time.perf_counter() - t0
    if budget_s is not None and t_warm * steps > budget_s:
      break
  if budget_s is not None:
    steps = int(min(steps, max(min_steps, budget_s // max(t_warm, 1e-9))))
  medians, blocks, pending = [], [], []

  def timed(fn):
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0

  for _ in range(repeats):
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      carry = block(step(carry))
      times.append(time.perf_counter() - t0)
      if not beside:
        continue
      pending.append(times[-1])
      if len(pending) == every or i == steps - 1:
        blocks.append((statistics.median(pending) * 1e3, {
            k: statistics.median(timed(fn) for _ in range(3)) * 1e3
            for k, fn in beside.items()}))
        pending = []
    medians.append(statistics.median(times) * 1e3)
  out = {"ms": statistics.median(medians), "ms_min": min(medians),
         "ms_max": max(medians), "steps": steps, "carry": carry}
  if beside:
    out["blocks"] = blocks
  return out


class CompileCounter:
  """Counts XLA backend compilations and their time via jax.monitoring."""

  _EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self._active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs):
    del kwargs
    if self._active and event == self._EVENT:
      self.count += 1
      self.seconds += duration

  @contextlib.contextmanager
  def counting(self):
    self.count, self.seconds, self._active = 0, 0.0, True
    try:
      yield self
    finally:
      self._active = False


_COUNTER: CompileCounter | None = None


def time_call(fn: Callable, *args, steps: int, repeats: int = 3,
              **kwargs) -> float:
  """Median ms of the jitted fn(*args) (`time_steps`; kwargs go there)."""
  f = jax.jit(fn)
  return time_steps(lambda _: f(*args), None, steps=steps, repeats=repeats,
                    **kwargs)["ms"]


def compile_counter() -> CompileCounter:
  """The process-wide counter (listeners cannot be unregistered)."""
  global _COUNTER
  if _COUNTER is None:
    _COUNTER = CompileCounter()
  return _COUNTER


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Jitted float32 n x n matmul throughput in GFLOP/s (the roofline)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def stream_gbs(mib: int = 256, steps: int = 10, repeats: int = 3) -> float:
  """Jitted float32 `x * 0.5` over `mib` MiB, in GB/s of bytes read and
  written: the rate of an elementwise pass whose operands do not fit in
  the last-level cache (memory bandwidth as XLA's loops see it)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (mib * 2 ** 18,), jnp.float32)
  ms = time_call(lambda a: a * 0.5, x, steps=steps, repeats=repeats)
  return 2 * x.nbytes / (ms * 1e-3) / 1e9


def nbytes(tree) -> int:
  """Total bytes of the arrays in a pytree."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype")))


def peak_memory_bytes() -> int | None:
  """Peak device memory if the backend reports it (GPU/TPU), else None."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def forced_devices_main(module: str, devices: int, flag: str, measure,
                        table, out: str, meta: dict) -> None:
  """The entry point of a benchmark whose rows need `devices` forced host
  devices: in the child (`flag` set) prints `measure()`'s rows; in the
  parent runs the child, writes {**meta, "rows": rows} to `out` and prints
  `table(rows)`."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get(flag):
    print("ROWS " + json.dumps(measure()))
    return
  rows = rows_from_child(module, devices, flag)
  with open(out, "w") as fh:
    json.dump({**meta, "rows": rows}, fh, indent=2)
  print(table(rows))


def rows_from_child(module: str, devices: int, flag: str) -> list:
  """Runs `python -m module` with `devices` forced host CPU devices (the
  flag must reach XLA before jax starts, so it is a fresh process) and
  `flag`=1 in its environment; returns the JSON after its last "ROWS " line."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{flag: "1"},
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-m", module], env=env, cwd=root,
                     capture_output=True, text=True, check=False)
  if r.returncode:
    sys.stderr.write(r.stderr[-3000:])
    raise SystemExit(r.returncode)
  return json.loads([l for l in r.stdout.splitlines()
                     if l.startswith("ROWS ")][-1][5:])
