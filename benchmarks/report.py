"""Tables and plots of benchmarks/README.md from a results JSON.

  python -m benchmarks.report benchmarks/results/<date>.json

The README's text between the BEGIN/END RESULTS markers is regenerated; the
rest (method notes, what was tried) is kept as written.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
BEGIN, END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"


def _rates(row) -> str:
  """The floor's rate in GFLOP/s: 'median (min-max)' over the point's
  blocks of steps; 'before / after' for runs that measured it around the
  point's steps; '-' for runs that measured it once per shape."""
  g = row.get("floor_gflops")
  if not g:
    return "-"
  if len(g) == 3:
    return f"{g[1]:.0f} ({g[0]:.0f}-{g[2]:.0f})"
  return f"{g[0]:.0f} / {g[1]:.0f}"


def _ratio(row, key: str, floor) -> str:
  """The row's step / floor as recorded (the median of its blocks' ratios),
  else ms over the floor (runs before blocks); '-' without a floor."""
  if floor is None:
    return "-"
  return f"{row.get(key) or row['ms'] / floor:.2f}"


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}"
  return str(v)


def _f2(v):
  """A two-decimal cell; "-" for a value not measured."""
  return "-" if v is None else f"{v:.2f}"


_BOUNDS_TEXT = (
    "\nTwo lower bounds on the rank-adaptive steps in the same rounds (ms). "
    "The chain a step runs one part after the other (`lenet.critical_path`, "
    "each part timed alone): the forward pass at the active width, fc1's "
    "basis extension (the longer side), its core truncation (500 x 500); "
    "the whole pass (forward + backward) for comparison. The work: each "
    "step pinned to one CPU (`lenet.one_core`); no step runs below that "
    "over the CPUs it has. DLRT / bound, with the larger of the two, is the "
    "most the method could reach against PyTorch in that round.\n")
_SPEEDUP_TEXT = (
    "\nThe work's speedup on the CPUs in the same rounds: each step's "
    "one-CPU time over its time on all of them. The dense step runs XLA's "
    "operations only; the rank-adaptive ones also run LAPACK's eigensolver "
    "on one thread, with the rest of the step waiting on it. At the dense "
    "step's speedup a rank-adaptive step would take its one-CPU time over "
    "that speedup: DLRT / that time is what the method would reach if its "
    "step used the CPUs as the dense one does.\n")


def _table(header, rows) -> list[str]:
  """A markdown table's lines: the header, its rule, a line a row."""
  line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
  return ([line(header), "|" + "---|" * len(header)]
          + [line(r) for r in rows])


def _spread(r) -> str:
  if r.get("ms_min") is None:
    return "(first run's log)"
  return f"[{r['ms_min']:.2f}, {r['ms_max']:.2f}]"


def plot_width(rows, path):
  widths = sorted({r["n"] for r in rows})
  fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3.6),
                           squeeze=False)
  for ax, n in zip(axes[0], widths):
    dense = [r for r in rows if r["n"] == n and r["method"] == "dense"]
    for m in sorted({r["method"] for r in rows} - {"dense"}):
      pts = sorted((r["r"], r["ms"]) for r in rows if r["n"] == n and r["method"] == m)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=m)
    if dense:
      ax.axhline(dense[0]["ms"], color="k", ls="--", label="dense")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(f"n = {n}")
    ax.set_xlabel("rank r")
    ax.set_ylabel("ms / step")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def tables_targets(targets) -> list[str]:
  """The targets table: measured value, met, and beside an unmet target
  the most it could reach (`run.targets`)."""
  rows = []
  for t in targets:
    met = "yes" if t["met"] else "no"
    if not t["met"] and t.get("reach") is not None:
      met += (f" (bound: at most {t['reach']:.2f}x"
              + (", out of reach" if t["reach"] < t["want"] else "")
              + (f"; {t['at_dense']:.2f}x at the dense step's speedup on the "
                 "CPUs" if t.get("at_dense") is not None else "") + ")")
    rows.append([t["target"], _fmt(t["value"]), met])
  return _table(["target", "measured", "met"], rows)


def tables(res) -> str:
  out = []
  m = res["machine"]
  out.append(f"Run of {res['date']} on {m['platform']}, {m['cpus']} CPUs, "
             f"backend {m['backend']}, jax {m['jax']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_avg'])}; "
             f"total wall {res['wall_seconds'] / 60:.1f} min"
             + {True: "; lrtrain's malloc settings held",
                False: "; glibc's malloc defaults"}.get(m.get("malloc_kept"), "")
             + ". Matmul roofline "
             f"(jitted float32 2048^3): {res['matmul_gflops']:.1f} GFLOP/s.\n")
  out.append("### Targets\n")
  out.extend(tables_targets(res["targets"]))
  out.append("\n### Step time vs width and rank (MLP, 3 hidden n x n layers, "
             "batch 256)\n")
  out.append("Median ms/step over 50 steps after warm-up (fewer for slow points: "
             "at most ~8 s per repeat, at least 5 steps; the steps column), "
             "[min, max] of the medians of 3 repeats; ratio to the dense step of the same width "
             "in the same run; achieved GFLOP/s from the analytic FLOP count "
             "as a fraction of the matmul roofline; bytes of trainable params + "
             "optimizer state vs the analytic r(n+m)+r^2 count.\n")
  out.append("Floor: the analytic FLOP count (`width.step_flops`: forward and "
             "backward matmuls, QR 4 n k^2 and SVD 22 k^3 at the augmented width "
             "k) at the jitted rate of the step's dominant product shape "
             "(`width.matmul_rate`'s three products, timed after every five of "
             "the point's steps; step / floor is the median over those blocks "
             "of the block's ratio (so not always ms/step over floor ms), "
             "floor ms the median floor; floor GFLOP/s "
             "column: median (min-max) over the blocks). Own shapes: each part of the count at the rate "
             "of its own product shape (`width.floor_shapes_ms`; the "
             "rank-adaptive methods' pass at width r, their QR, SVD and core "
             "gradient at 2r; the same as the floor for the other methods).\n")
  out.extend(_table(
      ["n", "r", "method", "ms/step", "floor ms", "step / floor",
       "floor GFLOP/s", "floor ms (own shapes)", "step / floor (own shapes)",
       "steps", "spread", "x dense", "roofline", "bytes / analytic"],
      [[r["n"], r["r"] or "-", r["method"], f"{r['ms']:.2f}",
        _f2(r.get("floor_ms")), _ratio(r, "step_over_floor", r.get("floor_ms")),
        _rates(r), _f2(r.get("floor_shapes_ms")),
        _ratio(r, "step_over_floor_shapes", r.get("floor_shapes_ms")),
        r.get("steps", "-"), _spread(r), f"{r['ratio']:.2f}",
        f"{r['roofline_fraction']:.2f}",
        f"{r['bytes'] / r['analytic_bytes']:.2f}"] for r in res["width"]]))
  out.append("\n![step time vs rank](results/width.png)\n")
  out.append("### LeNet5, batch 128 (28 x 28 x 1)\n")
  out.extend(_table(
      ["conv routine", "method", "ms/step", "spread", "x dense (same routine)"],
      [[r["impl"], r["method"], f"{r['ms']:.2f}", _spread(r), f"{r['ratio']:.2f}"]
       for r in res.get("lenet", [])]))
  if res.get("lenet_torch"):
    impl = res.get("lenet_default_impl", "im2col")   # the default before it was recorded
    ours = {r["method"]: r["ms"] for r in res.get("lenet", []) if r["impl"] == impl}
    out.append("\n### LeNet5 beside PyTorch (CPU, batch 128, `lenet_torch.py`)\n")
    out.append("PyTorch in its own venv, run after lrtrain's rows in the same "
               "benchmark run (minutes apart; the alternated rounds below "
               "decide the targets); the DLRT scheme is three passes (K, L, S) with "
               "Householder QR of [K | U] and an SVD of the 2r x 2r core, ranks "
               "held at 10 / 25 / 250 like lrtrain's rows.\n")
    pairs = {"torch_dense": ["dense"], "torch_dlrt_adaptive": ["kls_adaptive",
                                                               "geolora"]}
    out.extend(_table(
        ["PyTorch", "ms/step", f"lrtrain ({impl})", "ms/step",
         "PyTorch / lrtrain"],
        [[t["method"], f"{t['ms']:.2f}", mine, f"{ours[mine]:.2f}",
          f"{t['ms'] / ours[mine]:.2f}"]
         for t in res["lenet_torch"] for mine in pairs.get(t["method"], [])
         if mine in ours]))
  if res.get("lenet_paired"):
    out.append("\n### LeNet5 beside PyTorch, alternated rounds "
               "(`lenet_torch.paired`)\n")
    out.append("Each round times PyTorch's rows and then lrtrain's (XLA's "
               "convolution routine) back to back; the targets against "
               "PyTorch take each side's fastest round (PyTorch's DLRT "
               "step moves between about 120 and 200 ms from one process "
               "to the next here, lrtrain's rows far less).\n")
    rounds = res["lenet_paired"]
    out.extend(_table(
        ["round", "torch dense", "torch DLRT", "dense", "kls_adaptive",
         "geolora", "dense / torch", "DLRT / kls_adaptive", "DLRT / geolora"],
        [[x["round"]] + [_f2(x.get(k)) for k in (
            "torch_dense", "torch_dlrt_adaptive", "dense", "kls_adaptive",
            "geolora", "dense_over_torch", "dlrt_over_kls",
            "dlrt_over_geolora")] for x in rounds]))
    # Rows of runs before the one-CPU timing have the chain alone.
    lower = lambda x, m: x.get(f"lower_bound_{m}", x["bound"])
    for key, text, header, row in (
        ("bound", _BOUNDS_TEXT,
         ["round", "forward", "pass", "extension", "truncation", "chain",
          "kls_adaptive on 1 CPU", "geolora on 1 CPU", "CPUs",
          "kls_adaptive / bound", "geolora / bound", "DLRT / kls bound",
          "DLRT / geolora bound"],
         lambda x: [x["round"]] + [_f2(x.get(k)) for k in (
             "bound_forward", "bound_pass", "bound_extension",
             "bound_truncation", "bound", "kls_adaptive_one_cpu",
             "geolora_one_cpu")] + [x.get("cpus") or "-"]
         + [f"{x[m] / lower(x, m):.2f}" for m in ("kls_adaptive", "geolora")]
         + [_f2(x.get("dlrt_over_bound_kls_adaptive")),
            _f2(x.get("dlrt_over_bound_geolora"))]),
        ("speedup_dense", _SPEEDUP_TEXT,
         ["round", "dense on 1 CPU", "dense speedup", "kls_adaptive speedup",
          "geolora speedup", "DLRT / kls_adaptive at dense speedup",
          "DLRT / geolora at dense speedup"],
         lambda x: [x["round"]] + [_f2(x.get(k)) for k in (
             "dense_one_cpu", "speedup_dense", "speedup_kls_adaptive",
             "speedup_geolora", "dlrt_at_dense_speedup_kls_adaptive",
             "dlrt_at_dense_speedup_geolora")])):
      timed = [x for x in rounds if key in x]
      if timed:
        out.append(text)
        out.extend(_table(header, [row(x) for x in timed]))
  a = res.get("adaptive")
  if a:
    out.append("\n### Rank-adaptive run (digits MLP, KLS, "
               f"{a['steps']} steps, tau {a['tau']}, from rank {a['r0']})\n")
    out.append(f"- compilations: {a['compilations']} ({a['compile_seconds']:.1f} s "
               f"compiling); capacity-bucket changes: {a['bucket_changes']} "
               f"(limit log2(r_max) + 1 = {a['bucket_limit']})")
    out.append(f"- final ranks {a['final_ranks']}, capacities "
               f"{a['final_capacities']}, loss {a['final_loss']:.4f}")
    if "fixed_rank_ms" in a:   # runs before the alternated blocks
      out.append(f"- steady step {a['tail_ms']:.2f} ms vs fixed-rank KLS at "
                 f"the same ranks {a['fixed_rank_ms']:.2f} ms")
    else:
      out.append(f"- steady step (the run's last 200) {a['tail_ms']:.2f} ms")
    alt = a.get("alternated")
    if alt:
      out.append(f"- alternated ({alt['rounds']} rounds of {alt['round_steps']} "
                 f"steps each): adaptive {alt['adaptive_ms']:.2f} ms, fixed rank "
                 f"{alt['fixed_rank_ms']:.2f} ms, ratio (median of the rounds' "
                 f"ratios) {alt['ratio']:.2f}")
  s = res.get("seeds")
  if s:
    out.append(f"\n### Seeds vmapped (digits-demo shapes: 64 -> {s['width']} x 3 "
               f"-> 10, batch {s['batch']}, rank {s['rank']})\n")
    ks = sorted(next(iter(s["by_method"].values()))["vmapped_ms_by_seeds"],
                key=int)
    out.extend(_table(
        ["method", "1 seed, own program (ms/step)"]
        + [f"{k} vmapped (ms/step)" for k in ks]
        + ["throughput x (8 vmapped vs 8 sequential)"],
        [[m, f"{v['sequential_ms_per_step']:.2f}"]
         + [f"{v['vmapped_ms_by_seeds'][k]:.2f}" for k in ks]
         + [f"{v['speedup']:.2f}"] for m, v in s["by_method"].items()]))
    out.append("")
  if res.get("diagnostics"):
    out.append("### Diagnostics overhead (period 100, batch 128)\n")
    out.extend(_table(
        ["case", "train step ms", "diagnostics ms", "overhead"],
        [[d["case"], f"{d['train_step_ms']:.2f}", f"{d['diagnostics_ms']:.2f}",
          f"{100 * d['overhead_fraction']:.2f}%"] for d in res["diagnostics"]]))
  if res.get("breakdown"):
    out.append("\n### Where a rank-adaptive step's time goes (`breakdown.py`)\n")
    out.append("One QR of an n x C basis and one SVD of a C x C core (C = the "
               "capacity bucket, >= 2r), jitted alone; the augmentation does 2 "
               "QRs and the truncation 1 SVD per layer, 3 layers. grad = one "
               "forward + backward of the factored model.\n")
    out.extend(_table(
        ["n", "r", "C", "qr ms (GFLOP/s)", "svd ms (GFLOP/s)",
         "3 x (2 qr + svd) ms", "grad ms", "GeoLoRA step ms",
         "KLS-adaptive step ms", "dense step ms",
         "factorization share of GeoLoRA"],
        [[b["n"], b["r"], b["capacity"],
          f"{b['qr_ms']:.1f} ({b['qr_gflops']:.1f})",
          f"{b['svd_ms']:.1f} ({b['svd_gflops']:.1f})"]
         + [f"{b[k]:.1f}" for k in ("factorization_ms", "grad_ms",
                                    "geolora_step_ms", "kls_adaptive_step_ms",
                                    "dense_step_ms")]
         + [f"{100 * b['geolora_factorization_share']:.0f}%"]
         for b in res["breakdown"]]))
  return "\n".join(out) + "\n"


def write(res, readme: str = README):
  os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
  if res.get("width"):
    plot_width(res["width"], os.path.join(HERE, "results", "width.png"))
  text = open(readme).read() if os.path.exists(readme) else f"{BEGIN}\n{END}\n"
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  new = head + BEGIN + "\n" + tables(res) + END + tail   # before truncating
  with open(readme, "w") as f:
    f.write(new)


if __name__ == "__main__":
  with open(sys.argv[1]) as fh:
    write(json.load(fh))
