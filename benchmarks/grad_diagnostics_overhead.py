"""Cost of the gradient / update diagnostics (grad/*, update/*) in real runs.

For each config this builds the run as `lrtrain.main` does, times its
jitted train step and, at the trained weights, one call of the spectral
diagnostics (`Diagnostics`) and one of `GradientDiagnostics` (one extra
forward and backward on the next batch plus the update's top-k SVDs), all
on the host's CPU clock (process time: the machine's other load does not
count), and reports

  overhead = t_gradient_diagnostics / (diagnostics.every * t_step)

the fraction of training time the new keys add at the config's cadence.
The first call of each (tracing and compiling) is reported apart.

  taskset -c 1 python benchmarks/grad_diagnostics_overhead.py
  taskset -c 1 python benchmarks/grad_diagnostics_overhead.py configs/digits.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import block  # noqa: E402
from lrtrain import diagnostics, sweep, train  # noqa: E402

CONFIGS = ("configs/digits.py", "configs/lora_transformer.py")


def cpu_ms(fn, repeats: int) -> tuple[float, float]:
  """(first call, median of the next `repeats` calls) in CPU ms."""
  times = []
  for _ in range(repeats + 1):
    t0 = time.process_time()
    block(fn())
    times.append(1e3 * (time.process_time() - t0))
  return times[0], statistics.median(times[1:])


def measure(spec: str, *, steps: int, repeats: int) -> dict:
  path, _, arg = spec.partition(":")
  c = sweep.load_config_module(path).get_config(arg or None)
  run = train.build_run(c)
  d = c.diagnostics
  sharder = train.Sharder(c.get("mesh"))
  # Built before the (donating) steps consume the initial params.
  spectral = diagnostics.Diagnostics(run.init_params, top_k=d.top_k, eps=d.eps,
                                     full_spectrum=d.full_spectrum,
                                     heavy_tail=d.heavy_tail)
  params, _, _ = run.integrator.resize(run.init_params, None)
  state = run.integrator.init(params)
  params, state = sharder.place(params, state)
  step_fn = train.make_step_fn(run.integrator, run.loss_fn, sharder)
  batches = train.train_batches(run, 0)
  carry = {"p": params, "s": state}

  def one_step():
    carry["p"], carry["s"], aux = step_fn(carry["p"], carry["s"],
                                          sharder.batch(next(batches)))
    if not run.integrator.fixed_shape:
      carry["p"], carry["s"], _ = run.integrator.resize(carry["p"], carry["s"])
    return aux

  for _ in range(3):
    block(one_step())
  t_steps = []
  for _ in range(steps):
    t0 = time.process_time()
    block(one_step())
    t_steps.append(1e3 * (time.process_time() - t0))
  step_ms = statistics.median(t_steps)

  grads = diagnostics.GradientDiagnostics(run.loss_fn, top_k=d.update_k)
  spec_first, spec_ms = cpu_ms(lambda: spectral(carry["p"]), repeats)

  def grad_call():
    one_step()      # new weights: every call after the second has an update
    t0 = time.process_time()
    out = grads(carry["p"], sharder.batch(next(batches)))
    return out, time.process_time() - t0

  first_t = [1e3 * grad_call()[1] for _ in range(2)]   # compiles
  out, _ = grad_call()
  calls = [1e3 * grad_call()[1] for _ in range(repeats)]
  grad_ms = statistics.median(calls)
  row = {
      "config": spec, "integrator": c.integrator.name,
      "model": c.model.name, "factor": c.model.factor.kind,
      "diagnostics_every": int(d.every),
      "step_cpu_ms": step_ms,
      "spectral_diagnostics_cpu_ms": spec_ms,
      "spectral_first_call_cpu_ms": spec_first,
      "grad_diagnostics_cpu_ms": grad_ms,
      "grad_first_calls_cpu_ms": first_t,
      "num_new_keys": len(out),
      "overhead_fraction": grad_ms / (d.every * step_ms),
      "overhead_fraction_at_100": grad_ms / (100 * step_ms),
  }
  print(f"{spec}: step {step_ms:.2f} ms, spectral diagnostics {spec_ms:.1f} "
        f"ms, gradient diagnostics {grad_ms:.1f} ms (first two calls "
        f"{first_t[0]:.0f} + {first_t[1]:.0f} ms), overhead at every="
        f"{d.every}: {100 * row['overhead_fraction']:.2f}% (at 100: "
        f"{100 * row['overhead_fraction_at_100']:.2f}%)", flush=True)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("configs", nargs="*", default=list(CONFIGS))
  ap.add_argument("--steps", type=int, default=30, help="timed train steps")
  ap.add_argument("--repeats", type=int, default=5, help="timed calls")
  ap.add_argument("--out", default="", help="JSON file for the rows")
  args = ap.parse_args(argv)
  rows = [measure(s, steps=args.steps, repeats=args.repeats)
          for s in args.configs]
  if args.out:
    with open(args.out, "w") as fh:
      json.dump({"jax": jax.__version__, "device": str(jax.devices()[0]),
                 "cpu_affinity": sorted(os.sched_getaffinity(0)),
                 "rows": rows}, fh, indent=2, default=float)
  return rows


if __name__ == "__main__":
  main()
