"""End-to-end runner tests: the workdir contract of a digits runlocal run,
metrics keys, summary fields, the optimizer factory, the NaN guard."""

import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import config_utils, optim, sweep, train
from lrtrain.integrators import base


def digits_config(arg="runlocal"):
  return sweep.load_config_module("configs/digits.py").get_config(arg)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("digits"))
  summary = train.train_and_evaluate(digits_config(), wd)
  return wd, summary


def read_rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as fh:
    return [json.loads(line) for line in fh]


def test_workdir_contract(digits_run):
  wd, _ = digits_run
  for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
               "plots"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert any(f.endswith(".png") for f in os.listdir(os.path.join(wd, "plots")))
  with open(os.path.join(wd, "config.json")) as fh:
    cfg = json.load(fh)
  assert cfg["integrator"]["name"] == "kls" and cfg["runlocal"] is True


def test_metrics_keys(digits_run):
  wd, _ = digits_run
  rows = read_rows(wd)
  keys = set().union(*rows)
  for k in ("step", "train/loss", "train/learning_rate", "eval/loss",
            "eval/accuracy", "test/accuracy", "time/steps_per_sec",
            "rank/fc1", "rank/fc2", "spectral/fc1/stable_rank",
            "params/compression"):
    assert k in keys, k
  steps = [r["step"] for r in rows if "train/loss" in r]
  assert steps == [1, 2, 3]
  assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)


def test_summary_fields(digits_run):
  wd, summary = digits_run
  with open(os.path.join(wd, "summary.json")) as fh:
    s = json.load(fh)
  for k in ("test/accuracy", "params/train", "params/eval", "params/dense",
            "params/compression", "ranks", "time/wall_s", "time/steps_per_sec",
            "steps"):
    assert k in s, k
  assert s["steps"] == 3
  assert 0.0 <= s["test/accuracy"] <= 1.0
  assert s["params/eval"] < s["params/dense"]
  assert set(s["ranks"]) == {"rank/fc1", "rank/fc2"}
  assert s["ranks"] == summary["ranks"]
  # The step compiles once per capacity bucket: at most once per step here.
  assert 1 <= s["step_compilations"] <= s["steps"]
  # Steady rate leaves out the first (compiling) step.
  assert s["time/steady_steps_per_sec"] > s["time/steps_per_sec"] > 0


def test_rerun_finished_is_resume(digits_run):
  wd, summary = digits_run
  again = train.train_and_evaluate(digits_config(), wd)
  assert again["steps"] == 3 and again["ranks"] == summary["ranks"]
  assert again["test/accuracy"] == pytest.approx(summary["test/accuracy"])


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "warmup_cosine"])
def test_optimizer_lr_logged_and_schedule(name, schedule):
  cfg = config_utils.base_config().optimizer
  cfg.name, cfg.schedule, cfg.warmup_steps = name, schedule, 2
  cfg.learning_rate, cfg.clip_norm = 0.1, 1.0
  tx = optim.build(cfg, 10)
  p = {"w": jnp.ones(3)}
  st = tx.init(p)
  lrs = []
  for _ in range(4):
    u, st = tx.update({"w": jnp.ones(3)}, st, p)
    lrs.append(float(optim.learning_rate(st)))
  want = [float(optim.schedule(cfg, 10)(i)) for i in range(4)]
  np.testing.assert_allclose(lrs, want, rtol=1e-6)
  if schedule == "constant":
    assert lrs == [pytest.approx(0.1)] * 4


def test_adamw_decay_masked_off_orthonormal_factors():
  from lrtrain import factorizations as fz
  f = fz.lowrank.init(jax.random.key(0), 6, 5, 2)
  p = {"k": f, "b": jnp.ones(6)}
  cfg = config_utils.base_config().optimizer
  cfg.name, cfg.weight_decay, cfg.learning_rate = "adamw", 0.5, 0.1
  tx = optim.build(cfg, 5)
  t = base.trainable(p)
  zeros = jax.tree.map(jnp.zeros_like, t)
  u, _ = tx.update(zeros, tx.init(t), t)
  # zero gradients: only decay moves leaves; U and V must stay put
  assert float(jnp.abs(u["k"].U).max()) == 0.0
  assert float(jnp.abs(u["k"].V).max()) == 0.0
  assert float(jnp.abs(u["b"]).max()) > 0.0
  assert optim.integrator_weight_decay(cfg) == 0.0
  cfg.name = "sgd"
  assert optim.integrator_weight_decay(cfg) == 0.5


def test_nan_guard_names_step_and_layer(tmp_path):
  c = digits_config()
  c.integrator.name = "dense"
  c.model.factor.kind = "dense"
  c.optimizer.learning_rate = 1e30    # diverges within a couple of steps
  c.optimizer.name = "sgd"
  c.train.num_steps = 6
  c.train.checkpoint_every = 1
  with pytest.raises(train.DivergedError, match=r"step \d+ .*last good checkpoint"):
    train.train_and_evaluate(c, str(tmp_path))


def test_progress_plain_lines_when_not_a_tty(capsys):
  import io
  from lrtrain import writers
  s = io.StringIO()
  p = writers.Progress(10, enabled=True, every=5, stream=s)
  assert not p.interactive
  p.update(4, 0.5)
  p.update(5, 0.5)
  # one plain line every 5 steps, no bar (no rate measured yet)
  assert s.getvalue() == "step 5/10  - steps/s  ETA ?  loss 0.5000\n"


@pytest.mark.tier2
def test_vmapped_seeds_are_the_same_loop_as_sequential(tmp_path):
  """Two seeds of fixed-rank GeoLoRA (which buckets its buffers to 2r on the
  first resize) as one vmapped program equal the two runs one by one."""
  def cfg(seed):
    c = config_utils.apply_overrides(digits_config(), {
        "integrator.name": "geolora", "integrator.adaptive": False,
        "seed": seed, "diagnostics.enabled": False})
    return c
  cs = [cfg(0), cfg(1)]
  assert train.fixed_shape(cs[0])
  vm = train.train_seeds_vmapped(cs, [str(tmp_path / f"v{i}") for i in range(2)])
  seq = [train.train_and_evaluate(c, str(tmp_path / f"s{i}")) for i, c in enumerate(cs)]
  for a, b, i in zip(vm, seq, range(2)):
    assert a["ranks"] == b["ranks"]
    assert a["test/loss"] == pytest.approx(b["test/loss"], rel=1e-4)
    rows = [[json.loads(l) for l in open(tmp_path / f"{p}{i}" / "metrics.jsonl")]
            for p in ("v", "s")]
    la, lb = ([r["train/loss"] for r in rs if "train/loss" in r] for rs in rows)
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-6)
  assert vm[0]["test/loss"] != vm[1]["test/loss"]   # the seeds really differ
  with pytest.raises(config_utils.ConfigError, match="fixed-shape"):
    train.train_seeds_vmapped([digits_config(), digits_config()],
                              [str(tmp_path / "a"), str(tmp_path / "b")])


def test_run_replace_and_extra_hook(tmp_path):
  """A study replaces the initial params and adds a hook; the one loop
  calls it on the common cadence and writes what it returns."""
  c = config_utils.apply_overrides(digits_config(), {"diagnostics.enabled": False})
  run = train.build_run(c)
  scaled = jax.tree.map(lambda x: 0.5 * x if base.is_float(x) else x,
                        run.init_params)
  seen = []

  def norm(step, params, opt_state):
    del opt_state
    seen.append(step)
    return {"study/param_norm": float(optax.tree.norm(base.trainable(params)))}
  run = run.replace(init_params=scaled, hooks=(train.Hook(2, norm),))
  train.train(run, str(tmp_path))
  total = run.total
  assert seen == sorted({s for s in range(1, total + 1) if s % 2 == 0} | {total})
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "study/param_norm" in r] == seen
  with pytest.raises(TypeError):
    train.build_run(c).replace(no_such_field=1)


def test_method_options_are_the_methods_own():
  from lrtrain import integrators
  with pytest.raises(ValueError, match="unknown option.*rank"):
    integrators.build("galore", optax.sgd(0.1), rank=4)
  with pytest.raises(ValueError, match="unknown option.*tau"):
    integrators.build("condlr", optax.sgd(0.1), tau=0.1)
  with pytest.raises(ValueError, match="unknown option.*galore_rank"):
    integrators.build("dense", optax.sgd(0.1), galore_rank=4)
  assert "galore_rank" in integrators.options("galore")
  c = config_utils.apply_overrides(digits_config(), {
      "integrator.name": "galore", "optimizer.name": "adamw"})
  with pytest.raises(config_utils.ConfigError, match="integrator.name='galore'"):
    config_utils.validate(c)


def test_vmapped_seeds_resume(tmp_path):
  """Vmapped seeds checkpoint and resume like one run: 2 steps, then the
  same runs extended to 4, equal 4 steps at once."""
  def cfgs(steps):
    return [config_utils.apply_overrides(digits_config(), {
        "integrator.name": "dense", "model.factor.kind": "dense", "seed": s,
        "train.num_steps": steps, "train.checkpoint_every": 2,
        "optimizer.schedule": "constant",   # cosine would depend on num_steps
        "diagnostics.enabled": False}) for s in (0, 1)]
  part = [str(tmp_path / f"p{i}") for i in range(2)]
  train.train_seeds_vmapped(cfgs(2), part)
  seen = []
  hook = train.Hook(2, lambda step, p, s: seen.append(step))
  resumed = train.train([train.build_run(c).replace(hooks=(hook,)) for c in cfgs(4)],
                        part)
  assert seen == [4, 4]        # started at the saved step 2 (one call per seed)
  ref = train.train_seeds_vmapped(cfgs(4), [str(tmp_path / f"r{i}") for i in range(2)])
  for a, b in zip(resumed, ref):
    assert a["steps"] == b["steps"] == 4
    assert a["test/loss"] == pytest.approx(b["test/loss"], rel=1e-6)
  rows = [json.loads(l) for l in open(tmp_path / "p0" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]


def test_blowup_guard_judges_logged_losses():
  """A finite explosion (no NaN) is reported once; a healthy run is not."""
  g = train.BlowupGuard("warn", 1e6, every=2, total=20)
  with mock.patch.object(train.logging, "warning") as warn:
    for s, loss in enumerate([2.3, 2.0, 1e19, 5e18, 1e19, 3e18, 1e19, 1e19,
                              1e19, 1e19, 1e19, 1e19], start=1):
      g(s, loss)
  assert warn.call_count == 1        # step 1: baseline, 2: healthy, 4, 6, 8: blown up
  text = warn.call_args[0][0] % warn.call_args[0][1:]
  assert "at step 8" in text and "optimizer.learning_rate" in text
  healthy = train.BlowupGuard("error", 0.1, every=1, total=50)
  for s in range(1, 51):               # decreasing with a noisy spike: fine
    healthy(s, 2.3 / s + (5.0 if s == 30 else 0.0))
  fitted = train.BlowupGuard("error", 0.1, every=1, total=50)
  for s, loss in enumerate([2.3] + [0.0] * 20 + [1e-3] * 10, start=1):
    fitted(s, loss)                    # noise above a zero median: fine
  stop = train.BlowupGuard("error", 0.1, every=1, total=50)
  with pytest.raises(train.DivergedError, match="at step 4 .*blowing up"):
    for s, loss in enumerate([2.3, 50.0, 60.0, 70.0], start=1):
      stop(s, loss)


def test_blowup_error_ends_the_run(tmp_path):
  """Adam at lr 1e6 on digits: losses ~1e19 stay finite; with
  train.blowup=error the run ends naming the learning rate."""
  c = digits_config()
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e6
  c.train.num_steps = 6
  c.train.eval_every = 0
  c.diagnostics.enabled = False
  c.train.blowup = "error"
  with pytest.raises(train.DivergedError, match="blowing up.*learning_rate"):
    train.train_and_evaluate(c, str(tmp_path))


def test_blowup_mode_validated():
  c = digits_config()
  c.train.blowup = "loud"
  with pytest.raises(config_utils.ConfigError, match="train.blowup='loud'"):
    config_utils.validate(c)
