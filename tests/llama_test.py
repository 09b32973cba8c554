"""The LLaMA-style decoder: causality, rotary embeddings, RMSNorm, factorized
layers against their dense weights, parameter counts."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain import factorizations as fz
from lrtrain import models, sweep
from lrtrain.models import llama

KEY = jax.random.PRNGKey(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(kind="dense", rank=4, **sizes):
  c = models.default_model_config()
  c.name = "llama"
  c.factor.kind = kind
  c.factor.rank = rank
  c.d_model, c.num_heads, c.num_layers, c.mlp_dim, c.max_len = 32, 4, 2, 88, 16
  for k, v in sizes.items():
    c[k] = v
  return c


def _build(c, vocab=50, T=12):
  m = models.build(c, num_classes=vocab, input_shape=(T,))
  return m, models.init_params(m, KEY, (T,))


def _tokens(seed, shape, vocab=50):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def test_layer_paths_and_kinds():
  m, p = _build(_cfg("lowrank"))
  paths = sorted(k for k, _ in fz.factor_paths(p))
  want = sorted(f"block{i}/{g}/{n}/kernel" for i in range(2)
                for g, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                for n in names)
  assert paths == want                          # embed, norms and head dense
  assert p["head"]["kernel"].shape == (32, 50) and "bias" not in p["head"]
  assert p["embed"]["embedding"].shape == (50, 32)
  _, p = _build(_cfg("lowrank", tie_embeddings=True))
  assert "head" not in p
  c = _cfg("lowrank")
  c.dense_layers = ("block*/attn/*",)           # head factorized, attention dense
  _, p = _build(c)
  assert sorted(k for k, _ in fz.factor_paths(p))[-1] == "head/kernel"
  assert not any("attn" in k for k, _ in fz.factor_paths(p))


def test_causal():
  """Logits at position t do not change when tokens after t change."""
  m, p = _build(_cfg())
  x = _tokens(0, (3, 12))
  t = 6
  y = x.at[:, t + 1:].set(_tokens(1, (3, 12 - t - 1)))
  a = m.apply({"params": p}, x)
  b = m.apply({"params": p}, y)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6)
  assert float(jnp.max(jnp.abs(a[:, t + 1:] - b[:, t + 1:]))) > 1e-3


def test_rotary_score_depends_on_offset_only():
  rng = np.random.default_rng(0)
  k = 16
  q = jnp.asarray(rng.normal(size=(1, 1, 1, k)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(1, 1, 1, k)), jnp.float32)

  def score(m, n):
    qm = llama.rotary(q, jnp.array([m]), 10000.0)
    kn = llama.rotary(kv, jnp.array([n]), 10000.0)
    return float(jnp.sum(qm * kn))

  for m, n in ((3, 1), (7, 7), (2, 9), (40, 13)):
    for shift in (1, 5, 100):
      assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
  assert abs(score(5, 0) - score(0, 0)) > 1e-2    # the offset matters
  # a rotation: norms kept, position 0 is the identity
  x = jnp.asarray(rng.normal(size=(2, 5, 3, k)), jnp.float32)
  r = llama.rotary(x, jnp.arange(5), 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(r[:, 0], x[:, 0], atol=1e-6)
  # pair (x_j, x_{j + k/2}) turns by the angle t * theta^(-2j / k)
  t, j = 3, 2
  a = t * 10000.0 ** (-2 * j / k)
  x1, x2 = x[0, t, 0, j], x[0, t, 0, j + k // 2]
  np.testing.assert_allclose([r[0, t, 0, j], r[0, t, 0, j + k // 2]],
                             [x1 * math.cos(a) - x2 * math.sin(a),
                              x1 * math.sin(a) + x2 * math.cos(a)], rtol=1e-5)


def test_rms_norm_math():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 7, 10)).astype(np.float32) * 3.0
  scale = rng.normal(size=(10,)).astype(np.float32)
  want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + llama.NORM_EPS) * scale
  np.testing.assert_allclose(llama.rms_norm(jnp.asarray(x), jnp.asarray(scale)),
                             want, rtol=1e-5, atol=1e-6)
  # the module starts at scale 1: unit root-mean-square outputs, any input scale
  mod = llama.RMSNorm()
  v = mod.init(KEY, x)
  y = mod.apply(v, jnp.asarray(x) * 50.0)
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(y ** 2, axis=-1)), 1.0, rtol=1e-4)
  assert set(v["params"]) == {"scale"}


@pytest.mark.parametrize("kind", ["lowrank", "lora"])
@pytest.mark.parametrize("tie", [False, True])
def test_factorized_equals_dense_with_materialised_weights(kind, tie):
  mf, pf = _build(_cfg(kind, rank=4, tie_embeddings=tie))
  if kind == "lora":    # B = 0 at init; a nonzero adapter tests B A too
    pf = jax.tree.map(lambda n: dataclasses.replace(n, B=jax.random.normal(KEY, n.B.shape))
                      if isinstance(n, fz.Lora) else n, pf, is_leaf=fz.is_factor)
  md, pd = _build(_cfg("dense", tie_embeddings=tie))
  dense = jax.tree.map(lambda n: fz.materialize(n).T if fz.is_factor(n) else n,
                       pf, is_leaf=fz.is_factor)
  assert jax.tree.structure(dense) == jax.tree.structure(pd)
  x = _tokens(2, (2, 12))
  np.testing.assert_allclose(mf.apply({"params": pf}, x),
                             md.apply({"params": dense}, x), atol=2e-5, rtol=1e-4)


def _count(c, vocab, T):
  m = models.build(c, num_classes=vocab, input_shape=(T,))
  shapes = jax.eval_shape(lambda k: models.init_params(m, k, (T,)), KEY)
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize("size,vocab,total", [
    ("tiny", 256, 1_869_504),
    ("60m", 32000, 58_073_600),       # GaLore's "60M" LLaMA (58M)
    ("130m", 32000, 134_105_856),     # GaLore's "130M" LLaMA (134M)
])
def test_parameter_count_of_the_named_sizes(size, vocab, total):
  c = sweep.load_config_module(os.path.join(ROOT, "configs", "llama_lm.py")
                               ).get_config(f"size={size}").model
  kw = dict(vocab_size=vocab, d_model=c.d_model, num_layers=c.num_layers,
            mlp_dim=c.mlp_dim)
  assert llama.num_params(**kw) == total
  assert _count(c, vocab, c.max_len) == total
  c.tie_embeddings = True
  assert _count(c, vocab, c.max_len) == llama.num_params(**kw, tie_embeddings=True) \
      == total - vocab * c.d_model


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="divisible by model.num_heads"):
    models.build(_cfg(num_heads=5), num_classes=50, input_shape=(12,))
  with pytest.raises(ValueError, match="must be even"):
    models.build(_cfg(d_model=36, num_heads=4), num_classes=50, input_shape=(12,))
  with pytest.raises(ValueError, match="max_len"):
    models.build(_cfg(), num_classes=50, input_shape=(17,))
  with pytest.raises(ValueError, match="token sequences"):
    models.build(_cfg(), num_classes=10, input_shape=(8, 8, 1))
