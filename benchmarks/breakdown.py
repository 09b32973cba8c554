"""Where the time of a rank-adaptive step goes: the evidence behind unmet
speed targets.

For a width n and rank r of the width benchmark's MLP (three hidden n x n
LowRank layers, batch 256), times in one process, jitted and one after
another:

  step      the whole GeoLoRA / KLS-adaptive step (width.bench_point);
  grad      value_and_grad of the loss w.r.t. the factors (one forward and
            one backward: the part a single-pass method cannot avoid);
  qr        one QR of an n x C float32 basis (C = the capacity bucket >= 2r);
            the augmentation does two per layer (U and V);
  svd       one SVD of a C x C float32 core; the truncation does one per
            layer;
  dense     the dense step at the same width.

  python -m benchmarks.breakdown                        # default points, print
  python -m benchmarks.breakdown --merge results/X.json # add to a run, redo README

The factorization share is 3 layers x (2 qr + 1 svd) / step.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from benchmarks import common, width
from lrtrain import factorizations as fz
from lrtrain.integrators.base import value_and_grad

POINTS = ((1024, 256), (4096, 64))


def _time(fn, *args, steps=20, repeats=3):
  return common.time_call(fn, *args, steps=steps, repeats=repeats,
                          budget_s=4.0, min_steps=3)


def point(n: int, r: int, *, steps: int = 20) -> dict:
  C = fz.lowrank.bucket_capacity(r, n)
  key = jax.random.PRNGKey(0)
  X = jax.random.normal(key, (n, C))
  S = jax.random.normal(key, (C, C))
  qr = jax.jit(lambda a: jnp.linalg.qr(a))
  svd = jax.jit(lambda a: jnp.linalg.svd(a))
  out = dict(n=n, r=r, capacity=C,
             qr_ms=_time(qr, X, steps=steps), svd_ms=_time(svd, S, steps=steps))
  params = width.make_params("geolora", n, r, key, init="random")
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (width.BATCH, n)),
           "y": jax.random.randint(ky, (width.BATCH,), 0, width.CLASSES)}
  grad = jax.jit(lambda p: value_and_grad(width.loss_fn, p, batch))
  out["grad_ms"] = _time(grad, params, steps=steps)
  for m in ("dense", "geolora", "kls_adaptive"):
    out[f"{m}_step_ms"] = width.bench_point(m, n, 0 if m == "dense" else r,
                                            steps=steps, repeats=3,
                                            budget_s=4.0)["ms"]
  # LAPACK rates: Householder QR + forming Q ~ 4 n C^2 - 4/3 C^3 flops,
  # a C x C SVD with vectors ~ 22 C^3 (Golub-Van Loan's count).
  out["qr_gflops"] = (4 * n * C ** 2 - 4 / 3 * C ** 3) / (out["qr_ms"] * 1e6)
  out["svd_gflops"] = 22 * C ** 3 / (out["svd_ms"] * 1e6)
  fact = 3 * (2 * out["qr_ms"] + out["svd_ms"])
  out["factorization_ms"] = fact
  out["geolora_factorization_share"] = fact / out["geolora_step_ms"]
  return out


def run(points=POINTS, log=print) -> list[dict]:
  rows = []
  for n, r in points:
    row = point(n, r)
    rows.append(row)
    log(f"n={n} r={r} C={row['capacity']}: qr {row['qr_ms']:.1f} ms, svd "
        f"{row['svd_ms']:.1f} ms, grad {row['grad_ms']:.1f} ms, GeoLoRA step "
        f"{row['geolora_step_ms']:.1f} ms ({100 * row['geolora_factorization_share']:.0f}% "
        f"in 3 x (2 qr + svd)), dense step {row['dense_step_ms']:.1f} ms")
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--merge", default="", help="results JSON to add the rows to")
  args = ap.parse_args(argv)
  rows = run()
  if args.merge:
    with open(args.merge) as f:
      res = json.load(f)
    res["breakdown"] = rows
    with open(args.merge, "w") as f:
      json.dump(res, f, indent=1, default=float)
    from benchmarks import report
    report.write(res)
    print(f"merged into {args.merge}")


if __name__ == "__main__":
  main()
