"""Tests for lrtrain.attacks (FGSM, PGD, robust accuracy)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import attacks


@pytest.fixture(scope="module")
def trained():
  """A linear softmax classifier trained on 3 Gaussian blobs in 6-D."""
  key = jax.random.PRNGKey(0)
  k1, k2, k3 = jax.random.split(key, 3)
  centers = 2.0 * jax.random.normal(k1, (3, 6))
  y = jax.random.randint(k2, (300,), 0, 3)
  x = centers[y] + jax.random.normal(k3, (300, 6))
  params = {"W": jnp.zeros((6, 3)), "b": jnp.zeros((3,))}
  logits = lambda p, z: z @ p["W"] + p["b"]

  def loss(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits(p, x), y))
  g = jax.jit(jax.grad(loss))
  for _ in range(300):
    params = jax.tree.map(lambda a, b: a - 0.5 * b, params, g(params))
  fn = lambda z: logits(params, z)
  assert float(jnp.mean(jnp.argmax(fn(x), -1) == y)) > 0.85
  return fn, x, y


def test_fgsm_linf_exactly_eps_and_loss_increases(trained):
  fn, x, y = trained
  eps = 0.3
  x_adv = jax.jit(attacks.fgsm, static_argnums=0)(fn, x, y, eps)
  g = jax.grad(lambda z: jnp.sum(attacks.loss_per_example(fn, z, y)))(x)
  d = np.abs(np.asarray(x_adv - x))
  nz = np.asarray(g) != 0
  assert nz.mean() > 0.9
  np.testing.assert_allclose(d[nz], eps, rtol=1e-5)
  np.testing.assert_array_equal(d[~nz], 0.0)
  clean = attacks.loss_per_example(fn, x, y)
  adv = attacks.loss_per_example(fn, x_adv, y)
  # Convex loss in x: the linearisation step cannot decrease any example's
  # loss.
  assert np.all(np.asarray(adv) >= np.asarray(clean) - 1e-5)
  assert float(jnp.mean(adv)) > 2.0 * float(jnp.mean(clean))


def test_clipping_to_data_range(trained):
  fn, x, y = trained
  xa = attacks.fgsm(fn, x, y, 0.5, clip_min=-1.0, clip_max=1.0)
  assert float(xa.min()) >= -1.0 and float(xa.max()) <= 1.0
  xp = attacks.pgd(fn, x, y, 0.5, steps=3, clip_min=-1.0, clip_max=1.0)
  assert float(xp.min()) >= -1.0 and float(xp.max()) <= 1.0


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stronger_than_fgsm_and_in_ball(trained, random_start):
  fn, x, y = trained
  eps = 0.4
  xf = attacks.fgsm(fn, x, y, eps)
  xp = jax.jit(lambda a, b: attacks.pgd(
      fn, a, b, eps, steps=20, step_size=eps / 4,
      random_start=random_start, key=jax.random.PRNGKey(1)))(x, y)
  assert float(jnp.max(jnp.abs(xp - x))) <= eps + 1e-6
  lf = float(jnp.mean(attacks.loss_per_example(fn, xf, y)))
  lp = float(jnp.mean(attacks.loss_per_example(fn, xp, y)))
  assert lp >= lf - 1e-4


def _batches(x, y, size):
  for i in range(0, x.shape[0], size):
    yield {"x": np.asarray(x[i:i + size]), "y": np.asarray(y[i:i + size])}


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_robust_accuracy(trained, name):
  fn, x, y = trained
  clean = float(jnp.mean(jnp.argmax(fn(x), -1) == y))
  kw = {"steps": 5} if name == "pgd" else {}
  acc = attacks.robust_accuracy(fn, _batches(x, y, 128), [0.0, 0.5, 1.5],
                                attack=name, **kw)
  assert acc[0.0] == pytest.approx(clean, abs=1e-9)
  assert acc[0.0] >= acc[0.5] >= acc[1.5]
  assert acc[1.5] < clean - 0.1


def test_unknown_attack(trained):
  fn, x, y = trained
  with pytest.raises(ValueError):
    attacks.robust_accuracy(fn, _batches(x, y, 100), [0.1], attack="cw")
