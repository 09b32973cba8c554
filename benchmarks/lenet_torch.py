"""LeNet5 in PyTorch beside lrtrain's: a virtual environment of its own.

torch is not a dependency of lrtrain. This module makes (once) a venv with
the CPU build of torch, at $LRTRAIN_TORCH_VENV or ~/.cache/lrtrain/torch-venv,
and runs `benchmarks/torch_lenet.py` in it; each printed JSON line is a row.

  python -m benchmarks.lenet_torch          # prints the rows
  python -m benchmarks.lenet_torch --paired 5   # alternated with lrtrain's rows
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH = "torch==2.13.0+cpu"


def venv_path() -> str:
  return os.environ.get("LRTRAIN_TORCH_VENV", os.path.expanduser(
      "~/.cache/lrtrain/torch-venv"))


def ensure_venv(log=print) -> str:
  """The venv's python, creating the venv and installing torch if needed."""
  path = venv_path()
  py = os.path.join(path, "bin", "python")
  ok = os.path.exists(py) and subprocess.run(
      [py, "-c", "import torch"], capture_output=True).returncode == 0
  if not ok:
    log(f"lenet_torch: installing {TORCH} into {path}")
    subprocess.run([sys.executable, "-m", "venv", path], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", TORCH, "numpy"], check=True)
  return py


def run(*, steps: int = 30, repeats: int = 3, log=print) -> list[dict]:
  """Rows torch_dense and torch_dlrt_adaptive (ms per step); [] with a
  logged reason when torch cannot be installed here."""
  try:
    py = ensure_venv(log)
  except (subprocess.CalledProcessError, OSError) as e:
    log(f"lenet_torch: skipped, torch could not be installed ({e})")
    return []
  env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
  out = subprocess.run([py, os.path.join(HERE, "torch_lenet.py"), "--steps",
                        str(steps), "--repeats", str(repeats)],
                       capture_output=True, text=True, env=env, check=True)
  rows = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
  for r in rows:
    log(f"lenet5 torch  {r['method']:20s} {r['ms']:8.2f} ms  (torch "
        f"{r['torch']}, {r['threads']} threads)")
  return rows


def paired(*, rounds: int = 3, steps: int = 30, repeats: int = 3,
           log=print) -> list[dict]:
  """PyTorch's rows and lrtrain's LeNet5 rows (XLA's convolution routine)
  timed in alternation, `rounds` times: the ratios of each round come from
  timings taken minutes apart, which a machine whose speed drifts over a
  full run (`run.py` times the sections one after another) needs. Each
  round also times the chain of parts that a rank-adaptive step runs one
  after the other (`lenet.critical_path`) and each rank-adaptive step
  pinned to one CPU (`lenet.one_core`, its work): no step runs below its
  chain nor below its work over the CPUs it has, and PyTorch's DLRT time
  over the larger of the two is the most the method could reach against
  it in that round. The dense step pinned too gives the speedup XLA gets
  from the CPUs on this model; a rank-adaptive step running its work at
  that speedup would reach DLRT / (its one-CPU time / that speedup)."""
  from benchmarks import lenet
  out = []
  for i in range(rounds):
    theirs = {r["method"]: r["ms"] for r in run(steps=steps, repeats=repeats,
                                                log=lambda *a: None)}
    if not theirs:
      return out
    ours = {m: lenet.bench(m, lenet.DEFAULT, steps=steps, repeats=repeats)["ms"]
            for m in ("dense", "kls_adaptive", "geolora")}
    cp = lenet.critical_path(lenet.DEFAULT)
    one = lenet.one_core(("dense", "kls_adaptive", "geolora"), lenet.DEFAULT,
                         steps=steps, repeats=repeats)
    cpus = len(os.sched_getaffinity(0)) if one else 0
    adaptive = [m for m in one if m != "dense"]
    # No step runs below its chain (cp) nor below its one-CPU time over the
    # CPUs it has; PyTorch's time over that is the most it could reach.
    lower = {m: max(cp["bound"], one[m] / cpus) for m in adaptive}
    # The dense step (XLA's operations only, no LAPACK call) runs its work
    # on the CPUs at a speedup the rank-adaptive steps would need to match
    # (their eigensolver runs on one thread): at that speedup they would
    # take one[m] / speedup.
    speedup = {m: one[m] / ours[m] for m in one}
    at_dense = {m: one[m] / speedup["dense"] for m in adaptive}
    row = dict(round=i, **theirs, **ours,
               **{f"{m}_one_cpu": v for m, v in one.items()}, cpus=cpus,
               **{f"speedup_{m}": v for m, v in speedup.items()},
               **{f"lower_bound_{m}": v for m, v in lower.items()},
               **{f"dlrt_over_bound_{m}": theirs["torch_dlrt_adaptive"] / v
                  for m, v in lower.items()},
               **{f"at_dense_speedup_{m}": v for m, v in at_dense.items()},
               **{f"dlrt_at_dense_speedup_{m}": theirs["torch_dlrt_adaptive"] / v
                  for m, v in at_dense.items()},
               **{f"bound_{k}": cp[k] for k in ("forward", "pass",
                                                "extension", "truncation")},
               bound=cp["bound"],
               dense_over_torch=ours["dense"] / theirs["torch_dense"],
               dlrt_over_kls=theirs["torch_dlrt_adaptive"] / ours["kls_adaptive"],
               dlrt_over_geolora=theirs["torch_dlrt_adaptive"] / ours["geolora"])
    log(" ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in row.items()))
    out.append(row)
  return out


if __name__ == "__main__":
  import argparse
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                  help="alternate PyTorch and lrtrain ROUNDS times and print "
                       "each round's ratios")
  args = ap.parse_args()
  if args.paired:
    paired(rounds=args.paired)
  else:
    run()
