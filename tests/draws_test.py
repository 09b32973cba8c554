"""Initializer draws: flat draws reshaped, with the stated distributions."""

import jax
import numpy as np

from lrtrain import draws


def test_shapes_and_moments():
  k = jax.random.key(0)
  x = np.asarray(draws.normal(k, (40, 30, 5)))
  assert x.shape == (40, 30, 5)
  assert abs(x.mean()) < 0.03 and abs(x.std() - 1.0) < 0.03
  u = np.asarray(draws.uniform(k, (60, 100), minval=-1.0, maxval=1.0))
  assert u.min() >= -1.0 and u.max() < 1.0 and abs(u.std() - 1 / 3 ** 0.5) < 0.02


def test_lecun_normal_std_and_truncation():
  w = np.asarray(draws.lecun_normal(jax.random.key(1), (3, 3, 16, 64)))
  fan_in = 3 * 3 * 16
  assert abs(w.std() * fan_in ** 0.5 - 1.0) < 0.03
  assert np.abs(w).max() <= 2.0 / (0.8796 * fan_in ** 0.5) + 1e-6
  w2 = np.asarray(draws.lecun_normal(jax.random.key(1), (20, 50), fan_in=500))
  assert abs(w2.std() * 500 ** 0.5 - 1.0) < 0.05


def test_no_multi_axis_rng_in_compiled_init():
  """The draw's random bits are generated over one axis (the fast form)."""
  txt = jax.jit(lambda k: draws.normal(k, (16, 9))).lower(
      jax.random.key(0)).as_text()
  assert "tensor<16x9xui32>" not in txt
