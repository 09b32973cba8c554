"""Accuracy on meshes against the one-device run's own rounding spread.

A mesh changes nothing in the math of a step, only the order of its sums
(the batch gradient is a sum of per-device partial sums; a product
contracted over a sharded dimension too). This script trains the digits
demo (`configs/digits.py`: rank-adaptive KLS, Adam, 600 steps) on one
device with the examples of every batch in their stream order and in four
fixed shuffled orders (the same batches, so the same loss and gradients up
to rounding: only the summation order differs), and with the stream order
on meshes (data, model) = (8, 1), (4, 2), (2, 4) of 8 forced CPU devices.
The spread of the one-device runs is what the method's sensitivity to
rounding allows any other summation order to match.

  python -m benchmarks.mesh_spread    # prints the table, writes results/mesh_spread.json
"""

from __future__ import annotations

import json
import os
import tempfile

DEVICES = 8
ORDERS = (0, 1, 2, 3, 4)                    # 0: the stream's own order
MESHES = ((8, 1), (4, 2), (2, 4))
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "mesh_spread.json")


def _shuffled(train, order: int):
  """`train.train_batches` with each batch's rows in a fixed order."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  stream = train.train_batches

  def batches(run, step):
    rng = np.random.default_rng(order)
    for b in stream(run, step):
      p = rng.permutation(len(next(iter(b.values()))))
      yield {k: np.asarray(v)[p] for k, v in b.items()}
  return batches


def measure() -> list[dict]:
  """One row per (order, mesh)."""
  import jax  # pylint: disable=g-import-not-at-top
  from lrtrain import train  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top

  if jax.device_count() < DEVICES:
    raise SystemExit(f"needs {DEVICES} devices, have {jax.device_count()}")
  stream = train.train_batches
  cases = [(o, (1, 1)) for o in ORDERS] + [(0, m) for m in MESHES]
  rows = []
  for order, (data, model) in cases:
    c = digits.get_config()
    c.mesh.data, c.mesh.model = data, model
    c.logging.progress = False
    train.train_batches = _shuffled(train, order) if order else stream
    try:
      with tempfile.TemporaryDirectory() as wd:
        s = train.train_and_evaluate(c, wd)
    finally:
      train.train_batches = stream
    rows.append({"order": order, "data": data, "model": model,
                 "test_accuracy": s["test/accuracy"],
                 "test_loss": s["test/loss"], "ranks": s["ranks"]})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def table(rows: list[dict]) -> str:
  """The README table."""
  out = ["| run | mesh (data, model) | test accuracy | test loss | ranks |",
         "|---|---|---|---|---|"]
  for r in rows:
    run = ("stream order" if not r["order"] else
           f"shuffled within batches ({r['order']})")
    out.append(f"| {run} | ({r['data']}, {r['model']}) | "
               f"{r['test_accuracy']:.5f} | {r['test_loss']:.4f} | "
               f"{' / '.join(str(v) for v in r['ranks'].values())} |")
  return "\n".join(out)


def main() -> None:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.forced_devices_main("benchmarks.mesh_spread", DEVICES, "LRTRAIN_MESH_SPREAD_CHILD",
                             measure, table, OUT,
                             {"config": "configs/digits.py", "devices": DEVICES})


if __name__ == "__main__":
  main()
