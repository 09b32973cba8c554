"""Moment transport: the second-moment rules on the coordinates an
augmentation map reaches and on the new ones it does not."""

import jax.numpy as jnp
import numpy as np
import pytest

from lrtrain.integrators import transport as tr


def _augment_map(C=4, r=2):
  """An orthogonal rotation of the first r coordinates inside a C x C map;
  coordinates r.. (the new directions) get no mass."""
  c, s = np.cos(0.3), np.sin(0.3)
  A = np.zeros((C, C), np.float32)
  A[:r, :r] = [[c, -s], [s, c]]
  return jnp.asarray(A)


V = jnp.asarray(np.arange(1.0, 17.0, dtype=np.float32).reshape(4, 4))


@pytest.mark.parametrize("rule", tr.SECOND_RULES)
def test_second_rules_on_reached_and_new_coordinates(rule):
  A = _augment_map()
  out = np.asarray(tr.Congruence(A, A).second(V, rule))
  assert (out >= 0).all()
  reached = out[:2, :2]
  if rule == "root":
    want = np.square(np.asarray(A) @ np.sqrt(np.asarray(V)) @ np.asarray(A).T)[:2, :2]
  else:
    A2 = np.square(np.asarray(A))
    want = (A2 @ np.asarray(V) @ A2.T)[:2, :2]
  np.testing.assert_allclose(reached, want, rtol=1e-5)
  new = out[2:, :]                      # rows of new directions
  if rule == "squares":
    np.testing.assert_array_equal(new, np.asarray(V)[2:, :])   # old values kept
  elif rule == "squares_fresh":
    np.testing.assert_array_equal(new, 0.0)
  elif rule == "squares_mean":
    np.testing.assert_allclose(new, reached.mean(), rtol=1e-6)


def test_an_orthogonal_map_keeps_the_total_second_moment():
  A = _augment_map()
  out = tr.Congruence(A, A).second(V, "squares")
  # The reached block is a rotation of V's first 2 x 2 block.
  np.testing.assert_allclose(float(jnp.sum(out[:2, :2])),
                             float(jnp.sum(V[:2, :2])), rtol=1e-5)


def test_unknown_rule_is_refused_naming_the_method():
  from lrtrain.integrators import geolora, kls
  import optax
  for make, name in ((kls.make, "kls"), (geolora.make, "geolora")):
    with pytest.raises(ValueError, match=f"{name}: transport_rule='nope'"):
      make(optax.sgd(0.1), transport_rule="nope")


@pytest.mark.parametrize("rule", tr.SECOND_RULES)
def test_padded_block_maps_like_the_square_map(rule):
  """A padded Congruence built from the first rows of square maps (what a
  truncation keeping at most half the directions passes) gives the square
  maps' result, for the parameter, first and second moments, and for a
  one-sided map of a tall moment."""
  rng = np.random.default_rng(0)
  A = np.zeros((6, 6), np.float32)
  B = np.zeros((6, 6), np.float32)
  A[:3] = rng.normal(size=(3, 6))
  B[:3] = rng.normal(size=(3, 6))
  A, B = jnp.asarray(A), jnp.asarray(B)
  X = jnp.asarray(rng.uniform(0.1, 1.0, size=(6, 6)).astype(np.float32))
  full, block = tr.Congruence(A, B), tr.Congruence(A[:3], B[:3], padded=True)
  np.testing.assert_allclose(block.first(X), full.first(X), rtol=1e-6)
  np.testing.assert_allclose(block.second(X, rule), full.second(X, rule),
                             rtol=1e-6)
  tall = jnp.asarray(rng.uniform(0.1, 1.0, size=(9, 6)).astype(np.float32))
  np.testing.assert_allclose(tr.Congruence(None, B[:3], padded=True).first(tall),
                             tr.Congruence(None, B).first(tall), rtol=1e-6)
  with pytest.raises(ValueError, match="padded"):
    block.then(full)


@pytest.mark.parametrize("rule", tr.SECOND_RULES)
@pytest.mark.parametrize("j", [2, 3, 5])
def test_maps_with_zero_columns_contract_only_the_old_active_block(rule, j):
  """Congruence(..., inner=j) for maps whose columns from j on are zero
  (a truncation's coordinates of an old basis of rank j) equals the plain
  map, traced j included, on both sides and on one; where j fits in half
  the contracted axis the product does not read the other half (NaN
  there stays out of the result)."""
  import jax
  rng = np.random.default_rng(1)
  C, K = 6, 3
  A = np.zeros((K, C), np.float32)
  B = np.zeros((K, C), np.float32)
  A[:, :j] = rng.normal(size=(K, j))
  B[:, :j] = rng.normal(size=(K, j))
  A, B = jnp.asarray(A), jnp.asarray(B)
  X = jnp.asarray(rng.uniform(0.1, 1.0, size=(C, C)).astype(np.float32))
  tall = jnp.asarray(rng.uniform(0.1, 1.0, size=(9, C)).astype(np.float32))
  for M, Y in ((lambda **k: tr.Congruence(A, B, padded=True, **k), X),
               (lambda **k: tr.Congruence(None, B, padded=True, **k), tall)):
    plain = M()
    inner = jax.jit(lambda Y, j: (M(inner=j).first(Y), M(inner=j).second(Y, rule)))
    got = inner(Y, j)
    np.testing.assert_allclose(got[0], plain.first(Y), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[1], plain.second(Y, rule), rtol=1e-6,
                               atol=1e-7)
    if j <= C // 2 and rule != "squares":
      # ('squares' keeps unreached coordinates' old values, NaN included.)
      poisoned = Y.at[:, C // 2:].set(jnp.nan)
      if M().A is not None:
        poisoned = poisoned.at[C // 2:, :].set(jnp.nan)
      assert np.isfinite(np.asarray(inner(poisoned, j)[0])).all()
      assert np.isfinite(np.asarray(inner(poisoned, j)[1])).all()
      assert not np.isfinite(np.asarray(M().first(poisoned))).all()
