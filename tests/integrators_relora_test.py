"""ReLoRA: the merge keeps the weight and restarts the adapters at multiples
of k, W0 frozen in between, adapter moments pruned by magnitude, the jagged
cosine schedule, config checks, exact resume across a merge, and merges
reaching beyond what one rank-r adapter can fit."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lrtrain import checkpoint, config_utils, optim, sweep, train
from lrtrain import factorizations as fz
from lrtrain import integrators
from lrtrain.factorizations import lora, lowrank
from lrtrain.integrators import relora

N, M, R = 16, 12, 3


def _loss(p, b):
  y = fz.apply(p["w"], b["x"]) + p["b"]
  return jnp.mean(jnp.square(y - b["y"])), {}


def _problem(seed=0, n=N, m=M, r=R, target_rank=None):
  """Lora params on a random W0 and a regression batch whose target weight
  has rank `target_rank` (full by default) away from W0."""
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  W0 = jax.random.normal(k[0], (n, m)) / np.sqrt(m)
  p = {"w": lora.init(k[1], W0, r), "b": jnp.zeros(n)}
  E = jax.random.normal(k[2], (n, m))
  if target_rank is not None:
    E = E[:, :target_rank] @ jax.random.normal(k[3], (target_rank, m))
  E = E / np.sqrt(m)
  x = jax.random.normal(k[4], (64, m))
  x = x - x.mean(0)                     # the bias cannot lower the loss
  return p, {"x": x, "y": x @ (W0 + E).T}, E


def _run(integ, p, batch, steps):
  """The params and state after each of `steps` jitted steps."""
  st = integ.init(p)
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, batch))
  out = []
  for _ in range(steps):
    p, st, _ = step(p, st)
    out.append((p, st))
  return out


def _adam_states(st):
  """The ScaleByAdamState inside a relora state (adam via optax.adam)."""
  return [s for s in jax.tree.leaves(
      st.opt, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]


def test_merge_at_multiples_of_k_keeps_the_weight_and_restarts_adapters():
  p, batch, _ = _problem()
  k = 3
  rl = _run(integrators.build("relora", optax.adam(1e-2), relora_period=k),
            p, batch, 7)
  # The same optimizer without merges: equal up to the first merge.
  ref = _run(integrators.build("relora", optax.adam(1e-2), relora_period=10**6),
             p, batch, k)
  W0s = [p["w"].W0] + [q["w"].W0 for q, _ in rl]
  merged = [s for s in range(1, 8)
            if not np.array_equal(W0s[s], W0s[s - 1])]
  assert merged == [3, 6]
  for s in (1, 2, 4, 5, 7):             # W0 frozen between merges
    assert float(jnp.abs(rl[s - 1][0]["w"].B).max()) > 0
  for s in (1, 2):
    np.testing.assert_array_equal(rl[s - 1][0]["w"].W0, p["w"].W0)
  before, after = ref[k - 1][0]["w"], rl[k - 1][0]["w"]
  # Continuity: the layer's weight is the same before and after the merge,
  # and the new base is the old base plus the adapter product.
  np.testing.assert_allclose(lora.materialize(after), lora.materialize(before),
                             atol=1e-6)
  np.testing.assert_allclose(
      after.W0, before.W0 + before.scale * (before.B @ before.A), atol=1e-6)
  np.testing.assert_array_equal(after.B, jnp.zeros_like(after.B))
  np.testing.assert_array_equal(rl[k - 1][0]["b"], ref[k - 1][0]["b"])
  # A re-drawn from the state's seed, restart 1, node 0, as LoRA draws it.
  st = rl[k - 1][1]
  key = jax.random.fold_in(jax.random.fold_in(
      jax.random.wrap_key_data(st.key), 1), 0)
  np.testing.assert_array_equal(after.A, lora.init_A(key, R, M))
  assert not np.allclose(after.A, before.A)
  assert not np.allclose(after.A, p["w"].A)
  assert not np.allclose(rl[2 * k - 1][0]["w"].A, after.A)   # restart 2 differs
  assert int(st.count) == k
  assert float(rl[-1][0]["w"].scale) == float(p["w"].scale)


def test_restart_seed_follows_the_initial_adapters():
  a, b = _problem(0)[0], _problem(1)[0]
  assert not np.array_equal(relora.restart_seed(a), relora.restart_seed(b))
  np.testing.assert_array_equal(relora.restart_seed(a), relora.restart_seed(a))
  # init stores it: a resumed state keeps drawing from the same seed.
  integ = integrators.build("relora", optax.sgd(0.1))
  np.testing.assert_array_equal(integ.init(a).key, relora.restart_seed(a))


@pytest.mark.parametrize("fraction", [0.5, 0.99, 1.0])
def test_adapter_moments_pruned_by_magnitude_others_kept(fraction):
  p, batch, _ = _problem(n=32, m=24, r=4)
  k = 4
  rl = _run(integrators.build("relora", optax.adam(1e-2), relora_period=k,
                              relora_prune=fraction), p, batch, k)
  ref = _run(integrators.build("relora", optax.adam(1e-2), relora_period=10**6),
             p, batch, k)
  (got,), (want,) = _adam_states(rl[-1][1]), _adam_states(ref[-1][1])
  assert int(got.count) == int(want.count) == k
  for field in ("mu", "nu"):
    g, w = getattr(got, field), getattr(want, field)
    np.testing.assert_array_equal(g["b"], w["b"])        # not an adapter
    for leaf in ("A", "B"):
      x, full = np.asarray(getattr(g["w"], leaf)), np.asarray(getattr(w["w"], leaf))
      zero = x == 0
      assert zero.mean() >= fraction - 1.0 / x.size
      n_kept = x.size - int(round(fraction * x.size))
      # the kept entries are the largest in magnitude, unchanged
      top = np.sort(np.abs(full).ravel())[::-1][:n_kept]
      np.testing.assert_array_equal(np.sort(np.abs(x[~zero]))[::-1], top)


def test_prune_smallest_edge_fractions():
  x = jnp.arange(1.0, 11.0) * jnp.array([1, -1] * 5)
  np.testing.assert_array_equal(relora.prune_smallest(x, 0.0), x)
  np.testing.assert_array_equal(relora.prune_smallest(x, 1.0), jnp.zeros(10))
  np.testing.assert_array_equal(
      relora.prune_smallest(x, 0.3), jnp.where(jnp.abs(x) > 3, x, 0.0))


def _jagged_cfg(**kw):
  cfg = config_utils.base_config().optimizer
  cfg.learning_rate, cfg.schedule = 0.1, "jagged_cosine"
  cfg.warmup_steps, cfg.restart_period, cfg.restart_warmup = 5, 20, 4
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_jagged_cosine_restarts_from_zero_to_the_envelope():
  total = 100
  lr = optim.schedule(_jagged_cfg(), total)
  env = optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, total)
  got = np.array([float(lr(t)) for t in range(total)])
  want = np.array([float(env(t)) for t in range(total)])
  restarts = [20, 40, 60, 80]
  ramp = {r + s for r in restarts for s in range(4)}
  others = [t for t in range(total) if t not in ramp]
  np.testing.assert_allclose(got[others], want[others], rtol=1e-6)
  np.testing.assert_allclose(got[:20], want[:20], rtol=1e-6)   # first warmup
  for r in restarts:
    assert got[r] == 0.0
    # linear from 0 to the envelope at the ramp's end
    np.testing.assert_allclose(got[r:r + 5], np.arange(5) / 4 * want[r + 4],
                               rtol=1e-5)
  # the optimizer's logged rate is the schedule's
  tx = optim.build(_jagged_cfg(name="adam"), total)
  st, w = tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)}
  rates = []
  for _ in range(24):
    _, st = tx.update(w, st, w)
    rates.append(float(optim.learning_rate(st)))
  np.testing.assert_allclose(rates, got[:24], rtol=1e-6)


def _relora_config():
  return config_utils.apply_overrides(config_utils.base_config(), {
      "integrator.name": "relora", "model.factor.kind": "lora",
      "optimizer.schedule": "jagged_cosine", "optimizer.restart_warmup": 5})


def test_config_checks():
  c = _relora_config()
  config_utils.validate(c)
  # base_config links the two periods: setting either sets both
  c2 = config_utils.apply_overrides(c, {"integrator.relora_period": 30})
  assert c2.optimizer.restart_period == 30
  config_utils.validate(c2)
  c3 = config_utils.apply_overrides(c, {"optimizer.restart_period": 40})
  assert c3.integrator.relora_period == 40
  # a config without the link (built from a dict) is checked
  bad = ml_collections.ConfigDict(c.to_dict())
  bad.optimizer.restart_period, bad.integrator.relora_period = 50, 40
  with pytest.raises(config_utils.ConfigError,
                     match=r"optimizer.restart_period=50 must equal "
                           r"integrator.relora_period=40"):
    config_utils.validate(bad)
  with pytest.raises(config_utils.ConfigError, match="restart_warmup"):
    config_utils.validate(config_utils.apply_overrides(
        c, {"optimizer.restart_warmup": 200}))
  with pytest.raises(config_utils.ConfigError, match="integrator.relora_prune"):
    config_utils.validate(config_utils.apply_overrides(
        c, {"integrator.relora_prune": 1.5}))
  with pytest.raises(config_utils.ConfigError, match="integrator.relora_period"):
    config_utils.validate(config_utils.apply_overrides(
        c, {"integrator.relora_period": 0}))
  # a mismatch under another schedule is no restart: allowed
  config_utils.validate(config_utils.apply_overrides(c, {
      "optimizer.schedule": "constant", "optimizer.restart_period": 7}))


def test_make_errors():
  with pytest.raises(ValueError, match="relora_period"):
    integrators.build("relora", optax.sgd(0.1), relora_period=0)
  with pytest.raises(ValueError, match="relora_prune"):
    integrators.build("relora", optax.sgd(0.1), relora_prune=-0.1)
  integ = integrators.build("relora", optax.sgd(0.1))
  p = {"w": lowrank.init(jax.random.PRNGKey(0), 8, 6, 2), "b": jnp.zeros(8)}
  with pytest.raises(ValueError, match="integrator.name='relora' trains lora"):
    integ.init(p)


def test_merges_reach_beyond_one_adapter_rank():
  """A target of rank 8 away from W0 with rank-2 adapters: LoRA stays at
  or above the best rank-2 fit's loss, ReLoRA's merges go well below it."""
  p, batch, E = _problem(n=8, m=8, r=2, seed=3)
  x = batch["x"]
  # loss of the best rank-2 correction D: ||x (E - D)^T||^2 / (N n), the
  # tail of the singular values of E C^(1/2), C = x^T x / N.
  C = np.asarray(x.T @ x) / x.shape[0]
  w, V = np.linalg.eigh(C)
  s = np.linalg.svd(np.asarray(E) @ (V * np.sqrt(w)) @ V.T, compute_uv=False)
  floor = float(np.sum(s[2:] ** 2)) / 8
  steps = 600
  tx = optax.adam(optax.cosine_decay_schedule(0.05, steps))
  plain = _run(integrators.build("lora", tx), p, batch, steps)[-1][0]
  rl = _run(integrators.build("relora", tx, relora_period=50, relora_prune=1.0),
            p, batch, steps)[-1][0]
  l0 = float(_loss(p, batch)[0])
  l_lora, l_relora = float(_loss(plain, batch)[0]), float(_loss(rl, batch)[0])
  assert l_lora >= floor * 0.999
  assert l_relora < 0.3 * floor < l0
  assert np.linalg.matrix_rank(np.asarray(rl["w"].W0 - p["w"].W0), tol=1e-3) > 2


def test_checkpoint_resume_across_a_merge_is_exact(tmp_path):
  """Saved after step 2 of period 3 and restored the way the runner does
  (state structure from eval_shape of init on the restored params), the
  next 5 steps (merges after 3 and 6) equal the uninterrupted ones."""
  p0, batch, _ = _problem()
  integ = integrators.build("relora", optax.adam(1e-2), relora_period=3)
  step = jax.jit(lambda p, s: integ.step(_loss, p, s, batch))
  p, st = p0, integ.init(p0)
  for _ in range(2):
    p, st, _ = step(p, st)
  ck = checkpoint.Checkpoints(str(tmp_path / "ck"))
  ck.save(2, params=p, opt_state=st, rng=jnp.zeros((2,), jnp.uint32))
  for _ in range(5):
    p, st, _ = step(p, st)
  meta, g = ck.restore_leaves(2)
  groups = meta["groups"]
  q = jax.tree.map(jnp.asarray, checkpoint.rebuild(
      p0, g["params"], groups["params"]["paths"], "params"))
  sq = checkpoint.rebuild(jax.eval_shape(integ.init, q), g["opt_state"],
                          groups["opt_state"]["paths"], "optimizer state")
  sq = jax.tree.map(jnp.asarray, sq)
  for _ in range(5):
    q, sq, _ = step(q, sq)
  assert int(sq.count) == 7
  for a, b in zip(jax.tree.leaves((p, st)), jax.tree.leaves((q, sq))):
    np.testing.assert_array_equal(a, b)


def _lm_config(steps):
  c = sweep.load_config_module("configs/lora_transformer.py").get_config(
      "runlocal,method=relora")
  return config_utils.apply_overrides(c, {
      "train.num_steps": steps, "train.checkpoint_every": 4,
      "train.eval_every": 0, "diagnostics.enabled": False,
      "integrator.relora_period": 3, "optimizer.restart_warmup": 1})


@pytest.mark.tier2
def test_resume_across_a_merge_equals_an_uninterrupted_run(tmp_path):
  """8 steps, merges after 3 and 6; interrupted after step 5 (checkpoint at
  4), the rerun resumes across the merge at 6 to the same params and state
  as one uninterrupted run."""
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  s_full = train.train_and_evaluate(_lm_config(8), full)

  def stop(step, params, opt_state):
    raise KeyboardInterrupt

  run = train.build_run(_lm_config(8))
  with pytest.raises(train.Interrupted) as e:
    train.train(run.replace(hooks=(train.Hook(5, stop),)), part)
  assert e.value.checkpoint == 4
  s_part = train.train_and_evaluate(_lm_config(8), part)
  a = checkpoint.Checkpoints(f"{full}/checkpoints").restore_leaves(8)[1]
  b = checkpoint.Checkpoints(f"{part}/checkpoints").restore_leaves(8)[1]
  for x, y in zip(a["params"] + a["opt_state"], b["params"] + b["opt_state"]):
    np.testing.assert_array_equal(x, y)
  assert s_part["test/loss"] == s_full["test/loss"]


@pytest.mark.tier2
def test_short_lm_training_lowers_the_loss(tmp_path):
  c = config_utils.apply_overrides(_lm_config(40), {
      "train.log_every": 1, "train.checkpoint_every": 0,
      "integrator.relora_period": 10, "optimizer.restart_warmup": 2,
      "optimizer.learning_rate": 3e-3})
  train.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
  lr = {r["step"]: r["train/learning_rate"] for r in rows if "train/loss" in r}
  assert [s for s in lr if s > 1 and lr[s] == 0.0] == [11, 21, 31]
  assert np.mean([loss[s] for s in range(36, 41)]) < 0.9 * np.mean(
      [loss[s] for s in range(1, 6)])
