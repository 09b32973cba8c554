"""Checkpoints: round trip with changed capacities, kill-and-resume gives
bitwise the same params as an uninterrupted run, corrupt ones refused."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import checkpoint, sweep, train
from lrtrain import factorizations as fz
from lrtrain.integrators import buckets


def test_round_trip_after_capacity_change(tmp_path):
  f = fz.lowrank.init(jax.random.key(0), 12, 10, 3)
  params = {"fc1": {"kernel": f, "bias": jnp.arange(12.0)}}
  grown = {"fc1": {"kernel": fz.lowrank.resize(f, 8), "bias": params["fc1"]["bias"]}}
  tx = optax.adam(1e-3)
  st = tx.init(grown)
  ck = checkpoint.Checkpoints(str(tmp_path / "ck"))
  rng = jax.random.key_data(jax.random.key(3))
  ck.save(5, params=grown, opt_state=st, rng=rng)
  meta, g = ck.restore_leaves(ck.latest_step())
  # the template has capacity 3, the checkpoint 8: shapes come from the save
  p = checkpoint.rebuild(params, g["params"], meta["groups"]["params"]["paths"], "params")
  assert p["fc1"]["kernel"].capacity == 8
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(grown)):
    np.testing.assert_array_equal(a, b)
  o = checkpoint.rebuild(jax.eval_shape(tx.init, p), g["opt_state"],
                         meta["groups"]["opt_state"]["paths"], "opt")
  assert jax.tree.structure(o) == jax.tree.structure(st)
  np.testing.assert_array_equal(g["rng"][0], rng)
  with pytest.raises(checkpoint.CheckpointError, match="do not match"):
    checkpoint.rebuild({"other": params}, g["params"],
                       meta["groups"]["params"]["paths"], "params")


def test_zero_size_leaves_round_trip(tmp_path):
  """GaLore's state holds (0,)-shaped leaves for parameters it does not
  project; orbax cannot store those, the checkpoint keeps their shapes."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.arange(3.0)}
  st = {"mu": jnp.zeros((0,), jnp.float32), "proj": jnp.zeros((4, 0), jnp.bfloat16),
        "count": jnp.asarray(7, jnp.int32)}
  ck = checkpoint.Checkpoints(str(tmp_path / "ck"))
  ck.save(2, params=params, opt_state=st, rng=jnp.zeros((2,), jnp.uint32))
  meta, g = ck.restore_leaves(2)
  o = checkpoint.rebuild(st, g["opt_state"], meta["groups"]["opt_state"]["paths"],
                         "opt")
  for k in st:
    assert o[k].shape == st[k].shape and o[k].dtype == st[k].dtype, k
  assert int(o["count"]) == 7


def test_galore_run_checkpoints_and_resumes(tmp_path):
  c = sweep.load_config_module("configs/methods_fashion.py").get_config(
      "runlocal,model=mlp,method=galore")
  c.data.name = "digits"
  c.train.checkpoint_every = 2
  wd = str(tmp_path / "g")
  s = train.train_and_evaluate(c, wd)
  assert s["steps"] == c.train.num_steps
  again = train.train_and_evaluate(c, wd)      # finished: restores the last
  assert again["test/accuracy"] == pytest.approx(s["test/accuracy"])


def config(steps):
  c = sweep.load_config_module("configs/digits.py").get_config(
      f"runlocal,steps={steps}")
  c.train.num_steps = steps
  c.model.widths = (64,)             # one factorized layer: the resume
  c.train.checkpoint_every = 3       # checks hold per layer, compiles halve
  c.train.eval_every = 0
  c.diagnostics.enabled = False
  c.integrator.tau = 0.3             # ranks shrink: capacity buckets move
  c.optimizer.schedule = "constant"  # cosine would depend on num_steps
  return c


def final_leaves(wd, step):
  ck = checkpoint.Checkpoints(os.path.join(wd, "checkpoints"))
  _, g = ck.restore_leaves(step)
  return g["params"] + g["opt_state"]


def test_kill_and_resume_is_bitwise_equal(tmp_path):
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  s_full = train.train_and_evaluate(config(8), full)
  # an interrupted run: killed after its step-6 checkpoint (a shorter run of
  # the same config leaves exactly that state), then the command is rerun
  train.train_and_evaluate(config(6), part)
  s_part = train.train_and_evaluate(config(8), part)
  a, b = final_leaves(full, 8), final_leaves(part, 8)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert s_full["ranks"] == s_part["ranks"]
  steps = [r for r in open(os.path.join(part, "metrics.jsonl"))
           if '"train/loss"' in r]
  assert len(steps) == 8             # rows after the checkpoint not duplicated


def test_corrupt_checkpoint_refused(tmp_path):
  wd = str(tmp_path)
  train.train_and_evaluate(config(3), wd)
  step_dir = os.path.join(wd, "checkpoints", "3")
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as fh:
        fh.write(b"garbage")
  before = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
    train.train_and_evaluate(config(5), wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == before


def flip_bytes(step_dir, n=64):
  """Invert n bytes in the middle of the largest array data file (same
  size: what a bad disk or a partial copy leaves)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "arrays"))
           for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as fh:
    data = bytearray(fh.read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    fh.seek(0)
    fh.write(data)


def test_flipped_bytes_refused_or_fallback(tmp_path, caplog):
  """A checkpoint whose array bytes changed on disk is refused naming the
  step; with train.restore_fallback the run resumes from the step before,
  with a warning."""
  wd = str(tmp_path / "w")
  train.train_and_evaluate(config(6), wd)              # steps 3 and 6 saved
  flip_bytes(os.path.join(wd, "checkpoints", "6"))
  with open(os.path.join(wd, "metrics.jsonl")) as fh:
    rows = fh.read()
  with pytest.raises(checkpoint.CheckpointError,
                     match="checkpoint step 6 .* corrupt.*restore_fallback"):
    train.train_and_evaluate(config(8), wd)
  with open(os.path.join(wd, "metrics.jsonl")) as fh:
    assert fh.read() == rows                           # nothing rewritten
  c = config(8)
  c.train.restore_fallback = True
  with caplog.at_level("WARNING"):
    s = train.train_and_evaluate(c, wd)
  warned = [r.getMessage() for r in caplog.records
            if "restore_fallback" in r.getMessage()]
  assert len(warned) == 1 and "step 6 is corrupt" in warned[0]
  assert "resuming from step 3" in warned[0]
  assert s["steps"] == 8
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == [
      "6", "8", "corrupt_step_6"]
  steps = [json.loads(r)["step"] for r in open(os.path.join(wd, "metrics.jsonl"))
           if '"train/loss"' in r]
  assert steps == list(range(1, 9))    # rows after step 3 rewritten once


def test_digest_mismatch_and_checkpoints_without_digests(tmp_path):
  """Values that decode fine but differ from what was saved are caught by
  the digests in meta; a checkpoint saved before digests loads."""
  ck = checkpoint.Checkpoints(str(tmp_path / "ck"))
  params = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(3, jnp.bfloat16)}
  ck.save(4, params=params, opt_state={"n": jnp.asarray(2)}, rng=jnp.zeros(2, jnp.uint32))
  meta_file = os.path.join(str(tmp_path / "ck"), "4", "meta", "metadata")
  with open(meta_file) as fh:
    meta = json.load(fh)
  assert set(meta["digests"]) == {"000000", "000001", "000002", "000003"}
  meta["digests"]["000001"] = checkpoint.digest(np.zeros((3, 4), np.float32))
  with open(meta_file, "w") as fh:
    json.dump(meta, fh)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"step 4 .*params\['w'\] does not match the digest"):
    ck.restore_leaves(4)
  del meta["digests"]
  with open(meta_file, "w") as fh:
    json.dump(meta, fh)
  _, g = ck.restore_leaves(4)
  np.testing.assert_array_equal(g["params"][1], params["w"])


@pytest.mark.tier2
def test_killed_process_resumes(tmp_path):
  """A real kill: the child dies right after its step-3 checkpoint."""
  wd = str(tmp_path / "killed")
  code = (
      "import os, sys\n"
      "from lrtrain import checkpoint, train\n"
      "from tests import checkpoint_test as t\n"
      "orig = checkpoint.Checkpoints.save\n"
      "def save(self, step, **kw):\n"
      "  orig(self, step, **kw)\n"
      "  if step == 3: os._exit(9)\n"
      "checkpoint.Checkpoints.save = save\n"
      f"train.train_and_evaluate(t.config(6), {wd!r})\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert r.returncode == 9, r.stderr[-2000:]
  resumed = train.train_and_evaluate(config(6), wd)
  ref = train.train_and_evaluate(config(6), str(tmp_path / "ref"))
  for x, y in zip(final_leaves(wd, 6), final_leaves(str(tmp_path / "ref"), 6)):
    np.testing.assert_array_equal(x, y)
  assert resumed["ranks"] == ref["ranks"]
