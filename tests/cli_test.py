"""The command line: one `error:` line per user error (nothing written),
--show_config, the quiet default output, the windowed rate and Ctrl-C."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lrtrain import writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNLOCAL = ("--config", "configs/digits.py:runlocal")
ABSL_LOG = re.compile(r"^[IWEF]\d{4} ")     # absl's log line prefix


def env():
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def main(*args):
  return subprocess.run([sys.executable, "-m", "lrtrain.main", *args],
                        capture_output=True, text=True, cwd=ROOT, env=env())


def assert_one_error(r, *words):
  """Exit 1, stderr exactly one `error:` line naming `words`, no traceback
  and no escaped newlines."""
  assert r.returncode == 1, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "Traceback" not in r.stderr and "\\" not in lines[0]
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


def test_missing_config_file(tmp_path):
  r = main("--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
  assert_one_error(r, "configs/nope.py", "does not exist")
  assert not os.path.exists(tmp_path / "w")


def test_config_file_with_syntax_error(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None)\n  return None\n")
  r = main("--config", str(bad), "--workdir", str(tmp_path / "w"))
  assert_one_error(r, str(bad), "line 1")
  assert not os.path.exists(tmp_path / "w")
  debug = main("--config", str(bad), "--workdir", str(tmp_path / "w"), "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_unknown_config_argument(tmp_path):
  r = main("--config", "configs/digits.py:foo=1", "--workdir", str(tmp_path))
  assert_one_error(r, "'foo'", "accepted: method")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("override,words", [
    ("--config.integrator.taux=0.1",
     ("--config.integrator.taux", "no field 'taux'", 'Did you mean "tau"')),
    ("--config.dtype=bfloat16", ("--config.dtype", "no field 'dtype'")),
    ("--config.optim.lr=0.1", ("--config.optim.lr", "no field 'optim'")),
])
def test_unknown_override_field(override, words, tmp_path):
  r = main(*RUNLOCAL, "--workdir", str(tmp_path), override)
  assert_one_error(r, *words)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("override,words", [
    ("--config.seed=-1", ("seed=-1", "non-negative")),
    ("--config.data.classes=(11,12)", ("data.classes", "labels are 0..9")),
    ("--config.data.name=chars", ("data.name='chars'",
                                  "model.name='transformer'")),
])
def test_bad_value_writes_nothing(override, words, tmp_path):
  r = main(*RUNLOCAL, "--workdir", str(tmp_path / "w"), override)
  assert_one_error(r, *words)
  assert not os.path.exists(tmp_path / "w")


def test_show_config_and_help():
  r = main("--config", "configs/digits.py", "--show_config",
           "--config.integrator.tau=0.25")
  assert r.returncode == 0, r.stderr
  rows = {l.split()[0]: l.split()[1:] for l in r.stdout.splitlines()}
  assert rows["integrator.tau"] == ["float", "0.25"]
  assert rows["model.widths"][0] == "tuple"
  assert rows["train.eval_every"] == ["int", "100"]    # a derived field
  h = main("--help")
  assert "--show_config" in h.stdout and "--config.<path>=value" in h.stdout
  assert "--debug" in h.stdout


def test_quiet_default_output(tmp_path):
  """A short run: no absl INFO lines or config dump, progress lines with the
  validation accuracy, the result summary; -v 0 brings INFO back."""
  args = (*RUNLOCAL, "--config.train.num_steps=6",
          "--config.logging.progress=True")
  r = main(*args, "--workdir", str(tmp_path / "a"))
  assert r.returncode == 0, r.stderr
  out = r.stderr.splitlines() + r.stdout.splitlines()
  assert len(out) < 40, out
  assert not [l for l in out if ABSL_LOG.match(l) or l.startswith("data:")]
  assert re.search(r"^step 6/6 .*steps/s  ETA .*val acc \d\.\d{3}$",
                   r.stderr, re.M), r.stderr
  assert r.stdout.startswith("result: test accuracy")
  assert str(tmp_path / "a") in r.stdout
  loud = main(*args, "--workdir", str(tmp_path / "b"), "-v", "0")
  assert loud.returncode == 0
  assert [l for l in loud.stderr.splitlines() if ABSL_LOG.match(l)]


def test_step_rate_excludes_compilation_and_pauses():
  rate = writers.StepRate(window_s=100.0)
  rate.mark(1, now=30.0)              # a 30 s first (compiling) step
  for s in range(2, 12):
    rate.mark(s, now=30.0 + 0.01 * (s - 1))
  assert rate.value == pytest.approx(100.0)
  rate.restart()                      # an evaluation: 5 s without steps
  rate.mark(12, now=35.11)
  assert rate.value == pytest.approx(100.0)     # kept until a new interval
  for s in range(13, 23):
    rate.mark(s, now=35.11 + 0.02 * (s - 12))  # slower now
  assert rate.value == pytest.approx(50.0)
  # The first pause (mostly compilation) is not in the ETA yet...
  assert rate.eta(22, 122) == pytest.approx(100 * 0.02)
  rate.restart()
  rate.mark(23, now=35.31 + 1.02)     # a second pause of 1 s
  # ...from the second on, the pauses' share per step is.
  assert rate.eta(23, 123) == pytest.approx(100 * (0.02 + 2 * 1.0 / 22))


def test_step_rate_window_follows_the_current_speed():
  rate = writers.StepRate(window_s=1.0)
  t = 0.0
  for s in range(1, 200):
    t += 0.001 if s < 100 else 0.01
    rate.mark(s, now=t)
  assert rate.value == pytest.approx(100.0)


def test_progress_plain_lines(tmp_path):
  import io
  s = io.StringIO()
  meter = writers.StepRate()
  p = writers.Progress(100, meter=meter, stream=s)
  assert not p.interactive and p.every == 10
  for step in range(1, 21):
    meter.mark(step, now=step * 0.1)
    p.update(step, 0.25)
    if step == 10:
      p.observe({"eval/accuracy": 0.5, "eval/loss": 1.0})
  lines = s.getvalue().splitlines()
  assert lines == [
      "step 10/100  10.0 steps/s  ETA 0:00:09  loss 0.2500",
      "step 20/100  10.0 steps/s  ETA 0:00:08  loss 0.2500  val acc 0.500"]


@pytest.mark.tier2
def test_ctrl_c_one_line_and_resume(tmp_path):
  wd = str(tmp_path / "w")
  args = [sys.executable, "-m", "lrtrain.main", "--config", "configs/digits.py",
          "--workdir", wd, "--config.train.num_steps=20000",
          "--config.train.checkpoint_every=20", "--config.train.log_every=10"]
  p = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True,
                       preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                        signal.SIG_DFL))
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 5:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=60)
  assert p.returncode == 130, err
  last = err.strip().splitlines()[-1]
  m = re.fullmatch(r"interrupted at step (\d+); rerun the same command to "
                   r"resume from step (\d+)", last)
  assert m and "Traceback" not in err, err
  step, ckpt = int(m.group(1)), int(m.group(2))
  assert 20 <= ckpt <= step
  assert str(ckpt) in os.listdir(os.path.join(wd, "checkpoints"))
  # The same command resumes (shortened here to end soon after).
  r = subprocess.run(args + [f"--config.train.num_steps={ckpt + 2}"], cwd=ROOT,
                     env=env(), capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert f"resumed at step {ckpt}/{ckpt + 2}" in r.stderr
  assert json.load(open(os.path.join(wd, "summary.json")))["steps"] == ckpt + 2


def test_step_rate_with_a_pause_after_every_step():
  rate = writers.StepRate()
  for s in range(1, 5):
    rate.mark(s, now=float(s))
    rate.restart()
  assert rate.value == pytest.approx(1.0)


def test_sweep_cli_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(arg=None)\n  return None\n")
  sweep = lambda *a: subprocess.run(
      [sys.executable, "-m", "lrtrain.sweep", *a], capture_output=True,
      text=True, cwd=ROOT, env=env())
  assert_one_error(sweep("--config", str(bad), "--workdir", str(tmp_path),
                         "--list"), str(bad), "line 1")
  r = sweep("--config", "configs/digits.py", "--list")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: --workdir is required (--help lists the flags)"]


def test_debug_shows_the_traceback(tmp_path):
  r = main(*RUNLOCAL, "--workdir", str(tmp_path / "w"), "--config.seed=-1",
           "--debug")
  assert r.returncode != 0 and "Traceback" in r.stderr
  assert "ConfigError: seed=-1" in r.stderr
  assert not os.path.exists(tmp_path / "w")
