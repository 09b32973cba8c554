"""Per-op breakdown of one training step of the width benchmark's MLP.

Traces a few steps of one method at one width and rank with the JAX
profiler and sums the time of every XLA operation by kind and by category:

  matmul         dots (XLA's `dot` and the YNNPACK dot fusions)
  factorization  LAPACK calls: SVD, QR (geqrf + householder_product),
                 Cholesky, triangular solves, eigh
  other          elementwise fusions, copies, pads, slices, concatenates

and, with --by source, by the line of lrtrain that traced each operation
(its innermost stack frame in the library, from the tracing stacks XLA
keeps in the compiled module), with the operation kinds that make up
each line's time, and the rate of an elementwise pass over a buffer far
larger than the last-level cache (`common.stream_gbs`): the operations
that move n x C buffers without a product run near it.

Operations inside a conditional or a loop are counted where they run (the
conditional or loop itself is not counted again). Times are summed over
XLA's worker threads, so with two threads the total can exceed the step's
wall time; the step's untraced wall time is printed beside it.

  python -m benchmarks.opprofile --method geolora --n 1024 --r 64
  python -m benchmarks.opprofile --method kls_adaptive --n 4096 --r 64 --top 20
  python -m benchmarks.opprofile --model lenet5 --method geolora --by source
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

from benchmarks import common, width

FACTORIZATIONS = ("svd", "geqrf", "householder_product", "cholesky",
                  "triangular_solve", "eigh", "syevd", "potrf", "trsm")
CONTAINERS = ("cond", "while", "conditional", "call")


def kind_of(op_name: str) -> str:
  """'ynn_fusion.12' -> 'ynn_fusion'; 'wrapped_pad.3' -> 'wrapped_pad'."""
  return re.sub(r"(\.\d+)+(\.clone)?$", "", op_name)


def category(kind: str) -> str:
  if kind.startswith(("dot", "ynn_fusion")):
    return "matmul"
  if any(kind.startswith(f) for f in FACTORIZATIONS):
    return "factorization"
  return "other"


# The tables of a compiled module's text that hold the tracing stacks.
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
NO_SOURCE = "(no lrtrain frame)"


def _tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """{table: {id: entry}} for the module text's stack tables."""
  out, table = {}, None
  for line in hlo_text.splitlines():
    if line in _TABLES:
      table = out.setdefault(line, {})
    elif table is not None and re.match(r"^\d+ ", line):
      key, entry = line.split(" ", 1)
      table[int(key)] = entry
    else:
      table = None
  return out


def instruction_sources(hlo_text: str, root: str = "lrtrain/",
                        skip: tuple[str, ...] = ("lrtrain/lapack.py",)
                        ) -> dict[str, str]:
  """{instruction name: 'path:function:line'} from a compiled module's
  text (`jax.stages.Compiled.as_text()`): the innermost frame of the
  instruction's tracing stack whose file lies under a directory named
  `root` (path from there on; nested functions' names without
  '<locals>'), passing over the files in `skip` (`lrtrain.lapack` wraps
  every factorization: its caller names the call). Instructions with no
  such frame are left out."""
  t = _tables(hlo_text)
  if len(t) < len(_TABLES):
    return {}
  fields = lambda e: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", e)}
  files = {k: v.strip('"') for k, v in t["FileNames"].items()}
  funcs = {k: v.strip('"').replace("<locals>.", "")
           for k, v in t["FunctionNames"].items()}
  where = {}
  for k, e in t["FileLocations"].items():
    f = fields(e)
    path = files[f["file_name_id"]]
    if root in path and not path.endswith(skip):
      where[k] = (f"{root}{path.split(root, 1)[1]}:"
                  f"{funcs[f['function_name_id']]}:{f['line']}")
  # A frame's parent_frame_id counts from 1 (0: none), one above the
  # parent's own id: frame ids here count from 1 too.
  frames = {k: (f["file_location_id"], f["parent_frame_id"] - 1)
            for k, f in ((k, fields(e)) for k, e in t["StackFrames"].items())}

  def innermost(frame: int) -> str | None:
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      location, frame = frames[frame]
      if location in where:
        return where[location]
    return None

  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?stack_frame_id=(\d+)",
                       hlo_text, re.M):
    src = innermost(int(m.group(2)))
    if src is not None:
      out[m.group(1)] = src
  return out


def _build_step(method: str, n: int, r: int):
  params = width.make_params(method, n, r, jax.random.PRNGKey(0), init="random")
  integ = width.make_integrator(method, r)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (width.BATCH, n)),
           "y": jax.random.randint(ky, (width.BATCH,), 0, width.CLASSES)}
  step = jax.jit(lambda p, s, b: integ.step(width.loss_fn, p, s, b)[:2],
                 donate_argnums=(0, 1))
  return step, params, state, batch


def profile(method: str, n: int, r: int, *, steps: int = 10,
            model: str = "mlp") -> dict:
  """Wall ms per step (untraced) and op time per step by kind and category."""
  if model == "mlp":
    step, params, state, batch = _build_step(method, n, r)
  else:   # benchmarks/lenet.py: batch 128, the DLRT paper's ranks, XLA convs
    from benchmarks import lenet
    step, params, state, batch = lenet.make_step(method, lenet.DEFAULT)
  # One compilation: the program timed and traced is the one whose text
  # names the operations' source lines.
  step = step.lower(params, state, batch).compile()
  sources = instruction_sources(step.as_text())
  res = common.time_steps(lambda c: step(c[0], c[1], batch), (params, state),
                          steps=steps, repeats=1)
  params, state = res.pop("carry")
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        params, state = step(params, state, batch)
      jax.block_until_ready(params)
    path = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  by_kind = collections.Counter()
  count = collections.Counter()
  by_source = collections.Counter()
  source_count = collections.Counter()
  source_kinds = collections.defaultdict(collections.Counter)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "dur" not in e or name.startswith("$"):
      continue
    if not re.match(r"^[a-z][\w\-]*(\.\d+)*(\.clone)?$", name):
      continue                         # runtime spans, not XLA operations
    kind = kind_of(name)
    if kind.startswith(CONTAINERS):
      continue
    ms = e["dur"] / 1e3 / steps
    by_kind[kind] += ms
    count[kind] += 1
    src = sources.get(name, NO_SOURCE)
    by_source[src] += ms
    source_count[src] += 1
    source_kinds[src][kind] += ms
  by_cat = collections.Counter()
  for k, v in by_kind.items():
    by_cat[category(k)] += v
  return dict(model=model, method=method, n=n, r=r, wall_ms=res["ms"],
              op_ms=sum(by_kind.values()), by_category=dict(by_cat),
              by_kind={k: (v, count[k] // steps) for k, v in by_kind.most_common()},
              by_source={k: (v, source_count[k] // steps,
                             dict(source_kinds[k].most_common()))
                         for k, v in by_source.most_common()})


def report(p: dict, top: int = 12, log=print, by: str = "kind") -> None:
  where = ("LeNet5" if p.get("model") == "lenet5"
           else f"n={p['n']} r={p['r']}")
  log(f"{p['method']} {where}: step {p['wall_ms']:.2f} ms wall, "
      f"{p['op_ms']:.2f} ms of op time per step")
  for c in ("matmul", "factorization", "other"):
    log(f"  {c:14s} {p['by_category'].get(c, 0.0):7.2f} ms")
  if by == "kind":
    for k, (v, c) in list(p["by_kind"].items())[:top]:
      log(f"    {k:32s} {v:7.2f} ms  ({c} per step)")
    return
  if "stream_gbs" in p:
    log(f"  memory: an elementwise pass beyond the last-level cache moves "
        f"{p['stream_gbs']:.1f} GB/s (read + write; common.stream_gbs)")
  for k, (v, c, kinds) in list(p["by_source"].items())[:top]:
    parts = ", ".join(f"{kind} {ms:.2f}" for kind, ms in list(kinds.items())[:3])
    log(f"    {v:7.2f} ms {c:4d} ops  {k}  [{parts}]")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="mlp", choices=("mlp", "lenet5"),
                  help="the width benchmark's MLP (--n, --r) or the LeNet5 "
                       "benchmark's model (benchmarks/lenet.py)")
  ap.add_argument("--method", default="geolora", choices=width.METHODS)
  ap.add_argument("--n", type=int, default=1024)
  ap.add_argument("--r", type=int, default=64)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--by", default="kind", choices=("kind", "source"),
                  help="group operation time by XLA operation kind or by the "
                       "line of lrtrain that traced the operation")
  ap.add_argument("--json", default="", help="also write the breakdown here")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  p = profile(args.method, args.n, 0 if args.method == "dense" else args.r,
              steps=args.steps, model=args.model)
  if args.by == "source":
    p["stream_gbs"] = common.stream_gbs()
  report(p, args.top, by=args.by)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(p, f, indent=1)
  print(f"[{time.perf_counter() - t0:.0f} s]")


if __name__ == "__main__":
  main()
