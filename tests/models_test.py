"""Tests of the models: per-layer factor resolution, shapes, forward passes."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import data
from lrtrain import factorizations as fz
from lrtrain import models

KEY = jax.random.PRNGKey(0)


def _cfg(name, **factor):
  c = models.default_model_config()
  c.name = name
  for k, v in factor.items():
    c.factor[k] = v
  return c


def _kinds(params):
  return {p[:-len("/kernel")]: type(n).__name__ for p, n in fz.factor_paths(params)}


def test_default_config_declares_every_field():
  c = models.default_model_config()
  for key in ("name", "widths", "dense_layers", "conv_impl", "d_model", "num_heads",
              "num_layers", "mlp_dim", "patch_size", "max_len"):
    assert key in c
  for key in ("kind", "conv_kind", "rank", "capacity", "tucker_ranks", "alpha",
              "rank_stabilised", "init"):
    assert key in c.factor
  assert tuple(c.dense_layers) == ("head",)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="valid: mlp, lenet5, vgg, transformer"):
    models.build(_cfg("resnet"), num_classes=10, input_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="model.factor.kind"):
    models.build(_cfg("mlp", kind="tt"), num_classes=10, input_shape=(8, 8, 1))
  with pytest.raises(ValueError, match="lenet5 needs"):
    models.build(_cfg("lenet5"), num_classes=10, input_shape=(8, 8, 1))


def test_mlp_hidden_lowrank_last_dense():
  c = _cfg("mlp", rank=4)
  c.widths = (32, 16)
  m = models.build(c, num_classes=10, input_shape=(8, 8, 1))
  p = models.init_params(m, KEY, (8, 8, 1))
  assert _kinds(p) == {"fc1": "LowRank", "fc2": "LowRank"}
  assert p["head"]["kernel"].shape == (16, 10)
  assert m.apply({"params": p}, jnp.ones((3, 8, 8, 1)), train=False).shape == (3, 10)
  # analytic trainable count: r (n + m) + r^2 per factored layer + dense rest
  n_fac = sum(int(fz.num_params(f)) for _, f in fz.factor_paths(p))
  assert n_fac == 4 * (32 + 64) + 16 + 4 * (16 + 32) + 16


def test_rank_too_large_raises_at_build_naming_layer():
  c = _cfg("mlp", rank=20)
  c.widths = (32, 16)
  with pytest.raises(ValueError, match="layer 'fc2': rank 20"):
    models.build(c, num_classes=10, input_shape=(8, 8, 1))
  c.dense_layers = ("head", "fc2")  # keeping fc2 dense makes it buildable
  p = models.init_params(models.build(c, num_classes=10, input_shape=(8, 8, 1)), KEY,
                         (8, 8, 1))
  assert _kinds(p) == {"fc1": "LowRank"}


def test_policy_patterns_and_conv_kind():
  pol = models.FactorPolicy.from_config(_cfg("vgg", kind="lowrank", conv_kind="tucker"))
  assert pol.spec("conv2", conv=True).kind == "tucker"
  assert pol.spec("fc1").kind == "lowrank"
  assert pol.spec("head") is None
  c = _cfg("transformer", kind="lora", conv_kind="same")
  c.dense_layers = ("block*/mlp/*",)
  pol = models.FactorPolicy.from_config(c)
  assert pol.spec("block0/mlp/fc1") is None
  assert pol.spec("block1/attn/query").kind == "lora"
  assert models.FactorPolicy.from_config(_cfg("vgg", conv_kind="same")).spec(
      "conv1", conv=True).kind == "lowrank"
  assert models.FactorPolicy.from_config(_cfg("mlp", kind="dense")).spec("fc1") is None


def test_lenet5_shapes_and_layer_kinds():
  m = models.build(_cfg("lenet5", rank=8, conv_kind="lowrank"), num_classes=10,
                   input_shape=(28, 28, 1))
  shapes = jax.eval_shape(lambda k: models.init_params(m, k, (28, 28, 1)), KEY)
  assert shapes["fc1"]["kernel"].shape == (500, 800)  # (out, in): fc1 input 800
  assert shapes["conv1"]["kernel"].shape == (20, 25)
  assert shapes["conv2"]["kernel"].shape == (50, 500)
  assert shapes["head"]["kernel"].shape == (500, 10)


def test_vgg_tucker_convs_forward():
  c = _cfg("vgg", conv_kind="tucker", tucker_ranks=(8, 8), rank=8)
  c.dense_layers = ("head", "conv1")
  m = models.build(c, num_classes=10, input_shape=(8, 8, 1))
  p = models.init_params(m, KEY, (8, 8, 1))
  kinds = _kinds(p)
  assert kinds == {"conv2": "Tucker", "conv3": "Tucker", "conv4": "Tucker",
                   "conv5": "Tucker", "fc1": "LowRank"}
  y = m.apply({"params": p}, jax.random.normal(KEY, (2, 8, 8, 1)), train=False)
  assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_vit_transformer_lowrank_projections():
  c = _cfg("transformer", rank=4)
  c.d_model, c.mlp_dim, c.num_layers = 32, 64, 1
  m = models.build(c, num_classes=10, input_shape=(8, 8, 1))
  p = models.init_params(m, KEY, (8, 8, 1))
  assert set(_kinds(p)) == {f"block0/attn/{k}" for k in ("query", "key", "value", "out")} | {
      "block0/mlp/fc1", "block0/mlp/fc2"}
  assert not fz.is_factor(p["head"]["kernel"]) and not fz.is_factor(p["embed"]["kernel"])
  y = m.apply({"params": p}, jax.random.normal(KEY, (2, 8, 8, 1)), train=False)
  assert y.shape == (2, 10)
  with pytest.raises(ValueError, match="divisible by model.patch_size"):
    models.build(c, num_classes=10, input_shape=(10, 10, 1))
  with pytest.raises(ValueError, match="max_len"):
    models.build(c, num_classes=10, input_shape=(400,))


def test_transformer_lm_is_causal():
  c = _cfg("transformer", kind="lora", rank=4)
  c.d_model, c.mlp_dim, c.num_layers = 32, 64, 1
  m = models.build(c, num_classes=20, input_shape=(12,))
  p = models.init_params(m, KEY, (12,))
  # perturb the adapters so the Lora path is not the identity on W0
  p = jax.tree.map(
      lambda n: fz.Lora(n.W0, n.A, 0.1 * jnp.ones_like(n.B), n.scale)
      if isinstance(n, fz.Lora) else n, p, is_leaf=fz.is_factor)
  x = jax.random.randint(KEY, (2, 12), 0, 20)
  y = m.apply({"params": p}, x, train=False)
  assert y.shape == (2, 12, 20)
  x2 = x.at[:, 7:].set((x[:, 7:] + 1) % 20)  # change the future only
  y2 = m.apply({"params": p}, x2, train=False)
  np.testing.assert_allclose(y[:, :7], y2[:, :7], atol=1e-5)
  assert float(jnp.abs(y[:, 7:] - y2[:, 7:]).max()) > 1e-4


@pytest.mark.fashion_mnist
def test_lenet5_lowrank_forward_on_fashion_mnist():
  dc = data.default_data_config()
  dc.name, dc.max_train = "fashion_mnist", 64
  ds = data.load(dc)
  m = models.build(_cfg("lenet5", rank=10, conv_kind="lowrank"), num_classes=ds.num_classes,
                   input_shape=ds.input_shape)
  p = models.init_params(m, KEY, ds.input_shape)
  assert _kinds(p) == {"conv1": "LowRank", "conv2": "LowRank", "fc1": "LowRank"}
  batch = next(ds.batches("train", 8, seed=0))
  logits = m.apply({"params": p}, jnp.asarray(batch["x"]), train=False)
  assert logits.shape == (8, 10) and bool(jnp.all(jnp.isfinite(logits)))
  loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), batch["y"]])
  assert 0.5 < float(loss) < 10.0  # an untrained net: roughly log(10)


def test_transformer_lora_forward_on_char_data():
  dc = data.default_data_config()
  dc.name = "chars"
  ds = data.load(dc)
  c = _cfg("transformer", kind="lora", rank=4)
  c.d_model, c.mlp_dim, c.num_layers = 32, 64, 2
  m = models.build(c, num_classes=ds.num_classes, input_shape=ds.input_shape)
  p = models.init_params(m, KEY, ds.input_shape)
  assert len(_kinds(p)) == 12 and set(_kinds(p).values()) == {"Lora"}
  batch = next(ds.batches("train", 4, seed=0))
  logits = m.apply({"params": p}, jnp.asarray(batch["x"]), train=False)
  assert logits.shape == (4,) + ds.input_shape + (ds.num_classes,)
  loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                       jnp.asarray(batch["y"])[..., None], -1))
  assert np.isfinite(float(loss))
