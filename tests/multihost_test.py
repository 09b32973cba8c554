"""Two jax.distributed processes on localhost (4 CPU devices each, gloo
collectives) train the digits config in one shared workdir: only process 0
writes, each process feeds its own rows of the batch, and the run equals
the same config on one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/digits.py:runlocal", "--config.train.num_steps=4",
        "--config.diagnostics.enabled=False", "--config.optimizer.name=momentum"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices, **extra):
  e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
           XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  e.update({k: str(v) for k, v in extra.items()})
  return e


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as fh:
    return [json.loads(l) for l in fh]


def train_rows(rs):
  return [(r["step"], r["train/loss"]) for r in rs if "train/loss" in r]


def two_processes(workdir, extra=(), timeout=600, **env_extra):
  port = free_port()
  cmd = [sys.executable, "-m", "lrtrain.main", *ARGS, "--verbosity=0",
         "--workdir", workdir,
         *extra]
  procs = [subprocess.Popen(
      cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
              JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, **env_extra))
      for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


@pytest.mark.tier2
@pytest.mark.parametrize("mesh", [(8, 1), (4, 2)])
def test_two_processes_write_once_and_match_one(tmp_path, mesh):
  data, model = mesh
  extra = [f"--config.mesh.data={data}", f"--config.mesh.model={model}"]
  wd = str(tmp_path / "two")
  errs = two_processes(wd, extra)
  assert all("(process %d of 2)" % i in e for i, e in enumerate(errs))
  one = str(tmp_path / "one")
  r = subprocess.run([sys.executable, "-m", "lrtrain.main", *ARGS,
                      "--workdir", one, *extra], cwd=ROOT, env=env(8),
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  got, ref = rows(wd), rows(one)
  # One writer: every (step, key) once, as in the one-process run.
  assert [r["step"] for r in got] == [r["step"] for r in ref]
  assert [sorted(r) for r in got] == [sorted(r) for r in ref]
  # Each process fed its own half of the batch: the same losses.
  for (s1, l1), (s2, l2) in zip(train_rows(got), train_rows(ref)):
    assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)
  names = sorted(os.listdir(wd))
  assert names.count("metrics.jsonl") == 1 and "summary.json" in names
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["devices"] == 8
  assert summary["mesh"] == {"data": data, "model": model}
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]


@pytest.mark.tier2
def test_two_processes_with_a_warm_compilation_cache(tmp_path):
  # With a persistent compilation cache, the first run fills it and the
  # second's processes load what process 0 compiled: on the CPU backend
  # they hung in the first step's collectives, until
  # train.maybe_initialize_distributed turned the cache off there.
  cache = dict(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0)
  extra = ["--config.mesh.data=4", "--config.mesh.model=2"]
  for run in ("first", "second"):
    errs = two_processes(str(tmp_path / run), extra, timeout=300, **cache)
    assert all("persistent compilation cache off" in e for e in errs)
  assert len(rows(str(tmp_path / "second"))) == len(rows(str(tmp_path / "first")))
