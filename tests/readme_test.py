"""The README's "Your own Flax model and loop" block runs as written, trains,
and keeps GeoLoRA's invariants inside the user's optax chain (gradient
clipping in front of `geolora.as_transform`)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
  with open(os.path.join(ROOT, "README.md")) as fh:
    text = fh.read()
  section = text.split("### Your own Flax model and loop", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_own_model_and_loop_example_trains():
  code = _example()
  assert "range(200)" in code
  env: dict = {}
  exec(compile(code.replace("range(200)", "range(60)"), "README", "exec"), env)  # pylint: disable=exec-used
  params, loss_fn, ds = env["params"], env["loss_fn"], env["ds"]
  batch = next(iter(ds.batches("train", 256, seed=1)))
  fresh = env["net"].init(jax.random.key(0), jnp.zeros((1, *ds.input_shape)))["params"]
  assert float(loss_fn(params, batch)[0]) < 0.7 * float(loss_fn(fresh, batch)[0])
  (node,) = [x for _, x in fz.factor_paths(params)]
  r, C = int(node.rank), node.U.shape[1]
  assert C == 16 and 1 <= r <= C          # bucketed to 2 x rank 8 by resize
  U, V = np.asarray(node.U[:, :r]), np.asarray(node.V[:, :r])
  np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-4)
  np.testing.assert_allclose(V.T @ V, np.eye(r), atol=1e-4)


CHAIN = ("optax.chain(optax.clip_by_global_norm(1.0), "
         "geolora.as_transform(inner, tau=0.1))")


@pytest.mark.parametrize("wrap", ["apply_if_finite", "MultiSteps"])
def test_as_transform_inside_optax_wrappers(wrap):
  """The same loop with the chain wrapped in optax.apply_if_finite or
  optax.MultiSteps: it compiles, trains, keeps U, V orthonormal and the
  rank an int32 leaf."""
  code = _example()
  assert f"tx = {CHAIN}" in code
  wrapped = {"apply_if_finite": f"optax.apply_if_finite({CHAIN}, 3)",
             "MultiSteps": f"optax.MultiSteps({CHAIN}, 2)"}[wrap]
  env: dict = {"optax": optax}
  exec(compile(code.replace(f"tx = {CHAIN}", f"tx = {wrapped}").replace(  # pylint: disable=exec-used
      "range(200)", "range(20)"), "README", "exec"), env)
  (node,) = [x for _, x in fz.factor_paths(env["params"])]
  assert node.rank.dtype == jnp.int32
  r = int(node.rank)
  U, V = np.asarray(node.U[:, :r]), np.asarray(node.V[:, :r])
  np.testing.assert_allclose(U.T @ U, np.eye(r), atol=1e-4)
  np.testing.assert_allclose(V.T @ V, np.eye(r), atol=1e-4)
  assert np.isfinite(float(env["loss"]))
