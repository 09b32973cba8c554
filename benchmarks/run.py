"""Run every benchmark, write benchmarks/results/<date>.json, regenerate the
tables and plots of benchmarks/README.md.

  python -m benchmarks.run            # full (tens of minutes on 2 CPU cores)
  python -m benchmarks.run --quick    # < 2 minutes: breakage check, no timing claims

Ratios are measured side by side in one process; absolute times are context
only (the machine is shared and its load drifts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax

import lrtrain  # noqa: F401  (process defaults: one OpenBLAS thread, malloc settings)
from benchmarks import adaptive, common, diagnostics_overhead, lenet, lenet_torch, width

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def machine() -> dict:
  return dict(platform=platform.platform(), python=sys.version.split()[0],
              jax=jax.__version__, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], cpus=os.cpu_count(),
              load_avg=os.getloadavg(),
              # lrtrain's glibc malloc settings (lrtrain/__init__.py) held.
              malloc_kept=lrtrain.MALLOC_SET)


def targets(res: dict) -> list[dict]:
  """Each target of the benchmark spec with its measured value and verdict."""
  out = []
  rows = res.get("width", [])

  def ratio(method, n, r):
    for x in rows:
      if x["method"] == method and x["n"] == n and x["r"] == r:
        return x["ratio"]
    return None

  low = [x for x in rows if x["method"] not in ("dense", "galore", "lora")
         and x["n"] in (1024, 4096) and x["r"] in (64, 256)
         and x.get("step_over_floor") is not None]
  if low:
    worst = max(low, key=lambda x: x["step_over_floor"])
    out.append(dict(target="every low-rank method within 1.5x of its floor at "
                           "n in {1024, 4096}, r in {64, 256} (worst)",
                    value=f"{worst['step_over_floor']:.2f} ({worst['method']} "
                          f"n={worst['n']} r={worst['r']})",
                    met=worst["step_over_floor"] <= 1.5))
    own = [x for x in low if x.get("step_over_floor_shapes") is not None]
    if own:
      worst = max(own, key=lambda x: x["step_over_floor_shapes"])
      out.append(dict(
          target="every low-rank method within 1.5x of its floor at the "
                 "step's own shapes at n in {1024, 4096}, r in {64, 256} (worst)",
          value=f"{worst['step_over_floor_shapes']:.2f} ({worst['method']} "
                f"n={worst['n']} r={worst['r']})",
          met=worst["step_over_floor_shapes"] <= 1.5))
  for method, n, r, want in (("kls", 4096, 64, 8), ("kls_adaptive", 4096, 64, 4),
                             ("geolora", 4096, 64, 4)):
    g = ratio(method, n, r)
    out.append(dict(target=f"{method} >= {want}x faster than dense at n={n}, r={r}",
                    value=None if g is None else 1 / g,
                    met=None if g is None else 1 / g >= want))
  for method in ("kls_adaptive", "geolora"):
    g = ratio(method, 1024, 64)
    out.append(dict(target=f"{method} <= 1.2x dense at n=1024, r=64", value=g,
                    met=None if g is None else g <= 1.2))
  torch_rows = {x["method"]: x["ms"] for x in res.get("lenet_torch") or []}
  impl = res.get("lenet_default_impl", "im2col")
  ours = {x["method"]: x["ms"] for x in res.get("lenet") or [] if x["impl"] == impl}
  rounds = res.get("lenet_paired") or []
  # Each side at its fastest alternated round: PyTorch's DLRT step moves
  # between about 120 and 200 ms from process to process on this machine
  # (and between the repeats of one), lrtrain's rows far less, so a
  # per-round ratio would credit lrtrain with PyTorch's slow rounds.
  def fastest_ratio(theirs, key):
    """PyTorch's fastest round over `key`'s, None unless every round has it."""
    if rounds and all(key in x for x in rounds):
      return min(x[theirs] for x in rounds) / min(x[key] for x in rounds)
    return None

  for mine, theirs, want, text in (
      ("dense", "torch_dense", 1 / 1.3, "lrtrain dense LeNet5 <= 1.3x PyTorch dense"),
      ("kls_adaptive", "torch_dlrt_adaptive", 2, "KLS adaptive >= 2x faster than "
       "the DLRT reference scheme in PyTorch"),
      ("geolora", "torch_dlrt_adaptive", 3, "GeoLoRA >= 3x faster than the DLRT "
       "reference scheme in PyTorch")):
    if rounds:
      v = fastest_ratio(theirs, mine)
      text += f" (each side's fastest of {len(rounds)} alternated rounds)"
    elif mine in ours and theirs in torch_rows:
      v = torch_rows[theirs] / ours[mine]
    else:
      out.append(dict(target=text, value=None, met=None))
      continue
    # The most any step could reach: PyTorch's time over the larger of the
    # step's chain and its one-CPU time over the CPUs (`paired`); and what
    # it would reach using the CPUs as the dense step does.
    reach = fastest_ratio(theirs, f"lower_bound_{mine}")
    at_dense = fastest_ratio(theirs, f"at_dense_speedup_{mine}")
    out.append(dict(target=text, value=v if want >= 1 else 1 / v,
                    met=v >= want, reach=reach, at_dense=at_dense, want=want))
  a = res.get("adaptive")
  if a:
    lim = 1 + a["bucket_changes"]
    out.append(dict(target="compilations <= 1 + bucket changes",
                    value=f"{a['compilations']} (bucket changes "
                          f"{a['bucket_changes']})",
                    met=a["compilations"] <= lim))
    out.append(dict(target="bucket changes <= log2(r_max) + 1",
                    value=f"{a['bucket_changes']} <= {a['bucket_limit']}",
                    met=a["bucket_changes"] <= a["bucket_limit"]))
    # Runs before the alternated blocks: the run's tail over a separate
    # fixed-rank timing.
    tr = (a["alternated"]["ratio"] if "alternated" in a
          else a["tail_ms"] / a["fixed_rank_ms"])
    out.append(dict(target="adaptive step within 1.5x of fixed rank at the "
                           "same ranks (alternated blocks)", value=tr,
                    met=tr <= 1.5))
  mem = [x["bytes"] / x["analytic_bytes"] for x in rows]
  if mem:
    fixed = [x["bytes"] / x["analytic_bytes"] for x in rows
             if x["method"] in ("kls", "condlr", "dense")]
    out.append(dict(target="trainable params + optimizer state <= 1.1x "
                           "analytic (fixed-rank methods, worst)",
                    value=max(fixed), met=max(fixed) <= 1.1))
  d = res.get("diagnostics")
  if d:
    worst = max(x["overhead_fraction"] for x in d)
    out.append(dict(target="diagnostics <= 3% of wall time at period 100",
                    value=worst, met=worst <= 0.03))
  s = res.get("seeds")
  if s:
    out.append(dict(target="8 vmapped seeds >= 4x throughput of 8 sequential",
                    value=s["speedup"], met=s["speedup"] >= 4))
  return out


WIDTHS = (512, 1024, 2048, 4096, 5120)


# Alternated PyTorch / lrtrain LeNet5 rounds (`lenet_torch.paired`).
PAIRED_ROUNDS = 5

SECTIONS = ("width", "lenet", "lenet_critical_path", "lenet_torch",
            "lenet_paired", "adaptive", "seeds", "diagnostics")
# Sections only the quick run has (the full run times the critical path
# inside each alternated round).
QUICK_ONLY = ("lenet_critical_path",)


def run(quick: bool, *, widths=WIDTHS, import_log: str = "",
        partial_path: str = "", ranks=(8, 32, 64, 128),
        sections=SECTIONS) -> dict:
  """All sections. `widths` are timed now; with `import_log`, the other
  widths' rows come from that earlier run's printed log (same benchmark
  code, recorded per row as `source`). `partial_path` gets the results so
  far after every section and width row."""
  t0 = time.perf_counter()
  res = dict(date=datetime.date.today().isoformat(), quick=quick,
             machine=machine(), section_seconds={},
             lenet_default_impl=lenet.DEFAULT)
  log = lambda s: print(s, flush=True)

  def save(_=None):
    if partial_path:
      with open(partial_path, "w") as f:
        json.dump(res, f, indent=1, default=float)

  def section(name, fn):
    if name not in sections and name != "matmul_gflops":
      return
    ts = time.perf_counter()
    res[name] = fn()
    res["section_seconds"][name] = time.perf_counter() - ts
    log(f"[{name}: {res['section_seconds'][name]:.0f} s]")
    save()

  section("matmul_gflops", lambda: common.matmul_gflops(1024 if quick else 2048))
  log(f"matmul roofline: {res['matmul_gflops']:.1f} GFLOP/s")
  if quick:
    section("width", lambda: width.run([128], steps=5, repeats=1, ranks=(8,),
                                       log=log))
    section("lenet", lambda: lenet.run(steps=3, repeats=1, impls=(lenet.DEFAULT,),
                                       methods=("dense", "kls_adaptive"),
                                       log=log))
    # The full run times both inside each alternated round (lenet_paired).
    section("lenet_critical_path", lambda: dict(
        lenet.critical_path(steps=2, repeats=1),
        one_cpu=lenet.one_core(("kls_adaptive",), steps=2, repeats=1)))
  else:
    # Slow points (large n and r) are timed over fewer steps: at most ~8 s
    # per repeat, at least 5 steps; each row records the count.
    imported = (width.rows_from_log(import_log, set(WIDTHS) - set(widths))
                if import_log else [])

    def width_rows(rows):
      res["width"] = imported + rows
      save()

    section("width", lambda: imported + width.run(
        list(widths), steps=50, repeats=3, log=log, budget_s=8.0,
        on_row=width_rows, ranks=ranks))
    section("lenet", lambda: lenet.run(steps=50, repeats=3, log=log))
    section("lenet_torch", lambda: lenet_torch.run(log=log))
    # The same comparison with the two sides alternated: the sections above
    # run minutes apart, and the targets against PyTorch take these ratios.
    section("lenet_paired", lambda: lenet_torch.paired(rounds=PAIRED_ROUNDS,
                                                       log=log))

  def adaptive_section():
    return adaptive.adaptive_run(steps=60 if quick else 2000,
                                 rounds=3 if quick else 10)

  section("adaptive", adaptive_section)
  if "adaptive" in res:
    log(f"adaptive: {res['adaptive']['compilations']} compilations, "
        f"{res['adaptive']['bucket_changes']} bucket changes, final ranks "
        f"{res['adaptive']['final_ranks']}")
  if quick:
    section("seeds", lambda: adaptive.seeds_vmapped(num_seeds=4, steps=5,
                                                    methods=("kls_adaptive",),
                                                    scaling=False))
  else:
    section("seeds", adaptive.seeds_vmapped)
  if "seeds" in res:
    log(f"seeds vmapped speedup: {res['seeds']['speedup']:.2f}x")
  cases = ("lenet5/lowrank",) if quick else ()
  section("diagnostics", lambda: diagnostics_overhead.measure(quick=quick,
                                                              cases=cases))
  for row in res.get("width", []):
    row["roofline_fraction"] = row["gflops"] / res["matmul_gflops"]
  res["targets"] = targets(res)
  res["wall_seconds"] = time.perf_counter() - t0
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None, help="results JSON path")
  ap.add_argument("--widths", default="", help="comma-separated widths to time "
                  f"(default all of {WIDTHS})")
  ap.add_argument("--ranks", default="", help="comma-separated ranks for the "
                  "widths timed now (default 8,32,64,128 and n/4; given: "
                  "only these)")
  ap.add_argument("--sections", default="", help="comma-separated sections "
                  f"to run (default all of {SECTIONS})")
  ap.add_argument("--import_log", default="", help="printed log of an earlier "
                  "run: rows of the widths not timed now")
  args = ap.parse_args(argv)
  os.makedirs(RESULTS, exist_ok=True)
  name = datetime.date.today().isoformat() + ("-quick" if args.quick else "")
  path = args.out or os.path.join(RESULTS, f"{name}.json")
  widths = tuple(int(w) for w in args.widths.split(",") if w) or WIDTHS
  ranks = tuple(int(r) for r in args.ranks.split(",") if r)
  sections = tuple(x for x in args.sections.split(",") if x) or SECTIONS
  unknown = [x for x in sections if x not in SECTIONS]
  if unknown:
    raise SystemExit(f"--sections: unknown section(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(SECTIONS)}")
  if not args.quick and args.sections and set(sections) <= set(QUICK_ONLY):
    raise SystemExit(f"--sections: {', '.join(sections)} runs only with "
                     "--quick (the full run times it inside each round of "
                     "lenet_paired)")
  res = run(args.quick, widths=widths, import_log=args.import_log,
            partial_path=path, ranks=ranks or (8, 32, 64, 128),
            sections=sections)
  res["ranks_timed_now"] = list(ranks) or "default"
  with open(path, "w") as f:
    json.dump(res, f, indent=1, default=float)
  print(f"wrote {path}")
  if not args.quick and set(SECTIONS) - set(QUICK_ONLY) <= set(res):
    from benchmarks import report  # the README's tables need every section
    report.write(res)
  for t in res["targets"]:
    print(f"{'MET ' if t['met'] else 'NOT '} {t['target']}: {t['value']}")


if __name__ == "__main__":
  main()
