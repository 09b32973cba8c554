"""Starting a run from another run's weights (model.init_from): each layer
kind's start, shape checks, and the runner path end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import factorizations as fz
from lrtrain import models
from lrtrain import pretrained
from lrtrain import sweep
from lrtrain import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(kind, widths=(16, 12), rank=3, **factor):
  c = models.default_model_config()
  c.widths = widths
  c.factor.kind = kind
  c.factor.rank = rank
  c.factor.capacity = 8
  for k, v in factor.items():
    c.factor[k] = v
  m = models.build(c, num_classes=5, input_shape=(10,))
  return m, models.init_params(m, jax.random.key(1), (10,))


def _dense_pre():
  m, p = _params("dense")
  # Distinct values per layer, so a crossed layer would show.
  return m, jax.tree.map(lambda x: x + 0.01 * jnp.arange(x.size).reshape(
      x.shape).astype(x.dtype), p)


def test_each_kind_starts_from_the_pretrained_kernel():
  m_pre, pre = _dense_pre()
  x = jax.random.normal(jax.random.key(2), (4, 10))
  out_pre = m_pre.apply({"params": pre}, x, train=False)
  for kind, kw in [("lowrank", {"adapter": True}), ("lora", {})]:
    m, init = _params(kind)
    p = pretrained.adapt(init, pre, adapter=kind == "lowrank")
    for layer in ("fc1", "fc2"):
      node = p[layer]["kernel"]
      np.testing.assert_array_equal(node.W0, pre[layer]["kernel"].T)
    # W0 = W, zero adapter: the fine-tuning run starts at the pretrained
    # function exactly.
    np.testing.assert_allclose(m.apply({"params": p}, x, train=False), out_pre,
                               rtol=1e-6, atol=1e-6)
    f = p["fc1"]["kernel"]
    if kind == "lowrank":
      assert f.capacity == 8 and int(f.rank) == 3
      assert float(jnp.abs(f.S).max()) == 0.0
      # U spans W's top-3 left singular subspace.
      u = np.linalg.svd(np.asarray(pre["fc1"]["kernel"].T))[0][:, :3]
      np.testing.assert_allclose(np.linalg.svd(u.T @ np.asarray(f.U[:, :3]))[1],
                                 1.0, atol=1e-5)


def test_lowrank_without_adapter_is_the_truncated_svd():
  _, pre = _dense_pre()
  _, init = _params("lowrank", rank=4)
  p = pretrained.adapt(init, pre, adapter=False)
  W = np.asarray(pre["fc2"]["kernel"].T)
  u, s, vt = np.linalg.svd(W)
  f = p["fc2"]["kernel"]
  assert f.W0 is None
  np.testing.assert_allclose(fz.materialize(f), (u[:, :4] * s[:4]) @ vt[:4],
                             atol=1e-5)
  # Non-factor leaves (biases, the dense head) are copied.
  np.testing.assert_array_equal(p["head"]["kernel"], pre["head"]["kernel"])
  np.testing.assert_array_equal(p["fc2"]["bias"], pre["fc2"]["bias"])


def test_another_width_is_refused_naming_the_layer():
  _, pre = _dense_pre()
  _, init = _params("lowrank", widths=(16, 20))
  with pytest.raises(pretrained.PretrainedError, match="fc2.*shape"):
    pretrained.adapt(init, pre)


def test_runner_fine_tunes_from_a_trained_run(tmp_path):
  cfg = sweep.load_config_module(os.path.join(ROOT, "configs/digits.py")
                                 ).get_config("runlocal")
  pre_cfg = cfg.copy_and_resolve_references()
  pre_cfg.model.factor.kind = "dense"
  pre_cfg.integrator.name = "dense"
  pre_cfg.train.num_steps = 4
  pre_cfg.diagnostics.enabled = False
  pre_dir = str(tmp_path / "pre")
  train.train_and_evaluate(pre_cfg, pre_dir)
  _, pre = pretrained.load(pre_dir, 10, (64,))

  ft = cfg.copy_and_resolve_references()
  ft.model.init_from = pre_dir
  ft.model.factor.adapter = True
  run = train.build_run(ft)
  k = run.init_params["fc1"]["kernel"]
  np.testing.assert_array_equal(k.W0, np.asarray(pre["fc1"]["kernel"]).T)
  assert float(jnp.abs(k.S).max()) == 0.0

  ft.model.init_from = str(tmp_path / "nothing")
  with pytest.raises(pretrained.PretrainedError, match="model.init_from"):
    train.build_run(ft)
