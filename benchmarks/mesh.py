"""Bytes per device and step time vs mesh shape (lrtrain/sharding.py).

The width benchmark's MLP (three hidden 4096 x 4096 LowRank layers at
r = 64, input dimension 4096, dense 10-way output, batch 256) trained by
fixed-rank KLS with SGD + momentum, on meshes (data, model) = (1, 1),
(8, 1), (4, 2), (2, 4), (1, 8) of 8 devices. For each: the bytes of
params + optimizer state on the fullest device, split into the part the
rules shard over "model" (U, V and their moments) and the replicated rest,
and the median step time.

On a CPU the 8 devices are forced host devices sharing the machine's
cores (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by `main`
in a subprocess before jax starts): the bytes are what an accelerator
mesh would hold, the times mean little.

  python -m benchmarks.mesh            # prints the table, writes results/mesh.json
"""

from __future__ import annotations

import json
import os

MESHES = ((1, 1), (8, 1), (4, 2), (2, 4), (1, 8))
N, R, BATCH = 4096, 64, 256
DEVICES = 8
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "mesh.json")


def measure(steps: int = 5) -> list[dict]:
  """One row per mesh (run with DEVICES devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import common, width  # pylint: disable=g-import-not-at-top
  from lrtrain import train  # pylint: disable=g-import-not-at-top

  if jax.device_count() < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices, have {jax.device_count()}")
  rng = np.random.default_rng(0)
  host_batch = {"x": rng.standard_normal((BATCH, N)).astype(np.float32),
                "y": rng.integers(0, width.CLASSES, BATCH).astype(np.int32)}
  rows = []
  for data, model in MESHES:
    sharder = train.Sharder(ml_collections.ConfigDict(
        {"data": data, "model": model}))
    integ = width.make_integrator("kls", R)
    params = width.make_params("kls", N, R, jax.random.key(0), init="random")
    state = integ.init(params)
    params, state = sharder.place(params, state)
    sharded = replicated = 0
    per_device: dict = {}
    for x in jax.tree.leaves((params, state)):
      shard = x.addressable_shards[0].data.nbytes
      if x.sharding.is_fully_replicated:
        replicated += shard
      else:
        sharded += shard
      for sh in x.addressable_shards:
        per_device[sh.device] = per_device.get(sh.device, 0) + sh.data.nbytes
    batch = sharder.batch(host_batch)
    step = train.make_step_fn(integ, width.loss_fn, sharder)

    def one(carry):
      p, s = carry
      p, s, _ = step(p, s, batch)
      return p, s

    t = common.time_steps(one, (params, state), steps=steps, warmup=2,
                          repeats=1)
    rows.append({"data": data, "model": model,
                 "max_bytes_per_device": max(per_device.values()),
                 "sharded_bytes_per_device": sharded,
                 "replicated_bytes_per_device": replicated,
                 "step_ms": t["ms"], "steps": t["steps"]})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def table(rows: list[dict]) -> str:
  """The README table."""
  out = ["| mesh (data, model) | params + state, fullest device (MiB) | "
         "of it sharded over model (MiB) | replicated (MiB) | step (ms) |",
         "|---|---|---|---|---|"]
  mib = lambda b: f"{b / 2 ** 20:.2f}"
  for r in rows:
    out.append(f"| ({r['data']}, {r['model']}) | {mib(r['max_bytes_per_device'])}"
               f" | {mib(r['sharded_bytes_per_device'])} | "
               f"{mib(r['replicated_bytes_per_device'])} | {r['step_ms']:.0f} |")
  return "\n".join(out)


def main() -> None:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.forced_devices_main("benchmarks.mesh", DEVICES, "LRTRAIN_MESH_BENCH_CHILD",
                             measure, table, OUT,
                             {"n": N, "r": R, "batch": BATCH, "devices": DEVICES})


if __name__ == "__main__":
  main()
