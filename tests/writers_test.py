"""Who writes a run's files (process 0 only), what TensorBoard gets (test
metrics, hparams, indexed vectors, no replayed steps after a resume) and the
step-0 row of a fresh run."""

import json
import os
import shutil
import struct
import types

import jax
import numpy as np
import pytest

from lrtrain import sweep, train
from lrtrain import writers as writers_lib

WRITER_FILES = {"config.json", "metrics.jsonl", "summary.json", "plots",
                "tensorboard"}


def digits_config(*overrides):
  c = sweep.load_config_module("configs/digits.py").get_config("runlocal")
  c.logging.tensorboard = True
  for key, value in overrides:
    section, field = key.split(".")
    c[section][field] = value
  return c


def read_rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def read_events(logdir):
  """Every event of the event files in `logdir`, oldest file first (the
  TFRecord framing: length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for name in sorted(f for f in os.listdir(logdir) if "tfevents" in f):
    with open(os.path.join(logdir, name), "rb") as fh:
      data = fh.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12:i + 12 + n])
      events.append(ev)
      i += 12 + n + 4
  return events


def scalar_points(events, purge=True):
  """[(tag, step, value)] of the scalar events; with `purge` a SessionLog
  START at step s drops earlier points at steps >= s, as TensorBoard does."""
  points = []
  for ev in events:
    if purge and ev.HasField("session_log") and ev.session_log.status == 1:
      points = [p for p in points if p[1] < ev.step]
    for v in ev.summary.value:
      if v.WhichOneof("value") == "simple_value":
        points.append((v.tag, ev.step, v.simple_value))
  return points


def test_is_writer_follows_process_index(monkeypatch, tmp_path):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not writers_lib.is_writer()
  w = writers_lib.open_run(str(tmp_path), tensorboard=True)
  w.write(1, {"train/loss": 1.0})
  w.write_file("config.json", "{}")
  w.close()
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert writers_lib.is_writer()


@pytest.mark.parametrize("pid", [0, 1])
def test_only_process_0_writes_the_workdir(monkeypatch, tmp_path, pid):
  """A simulated second process of a multi-host run (process index 1 as
  the writers see it; the data sharding stays single-process) trains,
  evaluates and saves its checkpoint but leaves no other file."""
  monkeypatch.setattr(writers_lib, "jax",
                      types.SimpleNamespace(process_index=lambda: pid))
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(
      digits_config(("train.checkpoint_every", 0)), wd)
  assert summary["steps"] == 3
  written = set(os.listdir(wd))
  if pid == 0:
    assert written == WRITER_FILES | {"checkpoints", ".lock"}   # and its lock
  else:
    assert written == {"checkpoints"}    # orbax's, saved on every process
  assert os.listdir(os.path.join(wd, "checkpoints")) == ["3"]


@pytest.mark.tier2     # two runs end to end (12 s warm)
def test_tensorboard_contents_and_resume_without_duplicates(tmp_path):
  wd = str(tmp_path / "run")
  c = digits_config(("train.num_steps", 6), ("train.checkpoint_every", 3),
                    ("train.eval_every", 3), ("diagnostics.every", 3))
  train.train_and_evaluate(c, wd)
  # A run killed after step 6 was logged but before its checkpoint: the
  # resume starts from step 3 and replays steps 4-6.
  shutil.rmtree(os.path.join(wd, "checkpoints", "6"))
  train.train_and_evaluate(c, wd)
  # Run again when finished: nothing is trained and nothing written twice.
  train.train_and_evaluate(c, wd)

  events = read_events(os.path.join(wd, "tensorboard"))
  raw = scalar_points(events, purge=False)
  points = scalar_points(events)
  steps_of = lambda tag, pts: sorted(s for t, s, _ in pts if t == tag)
  # The replayed steps are in the first file, purged at step 4.
  assert steps_of("train/loss", raw) == [1, 2, 3, 4, 4, 5, 5, 6, 6]
  assert any(ev.HasField("session_log") and ev.step == 4 for ev in events)
  seen = [(t, s) for t, s, _ in points]
  assert len(seen) == len(set(seen)), "a scalar written twice at one step"
  assert steps_of("train/loss", points) == [1, 2, 3, 4, 5, 6]
  # Step 0 (ranks, diagnostics) and the final test metrics.
  assert steps_of("rank/fc1", points)[0] == 0
  assert steps_of("test/accuracy", points) == [6]
  rows = read_rows(wd)
  assert [r["step"] for r in rows if "test/accuracy" in r] == [6]
  assert [r["step"] for r in rows if "rank/fc1" in r] == list(range(7))
  # Vectors as indexed scalars, the values of metrics.jsonl.
  sv = [r["spectral/fc1/sv"] for r in rows
        if r["step"] == 3 and "spectral/fc1/sv" in r][0]
  by_tag = {t: v for t, s, v in points if s == 3}
  assert [by_tag[f"spectral/fc1/sv/{i}"] for i in range(len(sv))] == \
      pytest.approx(sv, rel=1e-6)
  assert not any(v.HasField("histo") for ev in events for v in ev.summary.value)
  # hparams: the config's scalar fields, test metrics as the hparam metrics.
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  data = [plugin_hparams_pb2.HParamsPluginData.FromString(
      v.metadata.plugin_data.content) for ev in events for v in ev.summary.value
          if v.metadata.plugin_data.plugin_name == "hparams"]
  starts = [d.session_start_info.hparams for d in data
            if d.HasField("session_start_info")]
  assert starts and starts[-1]["integrator.tau"].number_value == \
      pytest.approx(0.1)
  assert starts[-1]["integrator.name"].string_value == "kls"
  metrics = {m.name.tag for d in data if d.HasField("experiment")
             for m in d.experiment.metric_infos}
  assert metrics == {"test/accuracy", "test/loss"}


def test_fresh_run_logs_step_0_once(tmp_path):
  """A fresh run's first rows are the initial state (ranks before any
  truncation, diagnostics, no train/eval metrics); a fresh start in a
  workdir with rows but no checkpoint drops those stale rows. (That a
  resumed run does not log step 0 again is in the TensorBoard test.)"""
  wd = str(tmp_path / "run")
  c = digits_config()
  train.train_and_evaluate(c, wd)
  rows0 = [r for r in read_rows(wd) if r["step"] == 0]
  assert {"rank/fc1", "spectral/fc1/sv", "intruders/fc1/maxsim"} <= \
      set().union(*rows0)
  assert [r["rank/fc1"] for r in rows0 if "rank/fc1" in r] == [32]
  assert not any(k.startswith(("eval/", "train/")) for r in rows0 for k in r)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  train.train_and_evaluate(c, wd)
  rows = read_rows(wd)
  assert [r["step"] for r in rows if "rank/fc1" in r] == [0, 1, 2, 3]
  assert sum("spectral/fc1/sv" in r for r in rows if r["step"] == 0) == 1
  assert [r["step"] for r in rows if "test/accuracy" in r] == [3]
  assert np.isfinite([r["train/loss"] for r in rows if "train/loss" in r]).all()
