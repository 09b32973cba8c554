"""Regression: a rank-adaptive KLS step vmapped over several seeds must
finish and agree with the per-seed steps (jaxlib's batched CPU
factorizations deadlocked it; `lrtrain.lapack` keeps them unbatched). Run
with XLA's concurrency-optimized scheduler on, which runs the most
factorizations side by side."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import jax, jax.numpy as jnp, numpy as np, optax
from lrtrain import factorizations as fz, integrators

def init(key):
  ks = jax.random.split(key, 4)
  p = {}
  for i, (n, m) in enumerate([(256, 64), (256, 256), (256, 256)]):
    W = jax.random.normal(ks[i], (n, m)) / np.sqrt(m)
    p[f"fc{i}"] = {"kernel": fz.lowrank.from_dense(W, 32, capacity=64),
                   "bias": jnp.zeros((n,))}
  p["out"] = {"kernel": jax.random.normal(ks[3], (256, 10)) / 16.0,
              "bias": jnp.zeros((10,))}
  return p

def loss_fn(p, b):
  x = b["x"]
  for i in range(3):
    x = jax.nn.relu(fz.apply(p[f"fc{i}"]["kernel"], x) + p[f"fc{i}"]["bias"])
  logits = x @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), {}

integ = integrators.build("kls", optax.sgd(0.05, momentum=0.9), adaptive=True,
                          tau=0.05, r_min=2, r_max=32)
kx, ky = jax.random.split(jax.random.PRNGKey(1))
b = {"x": jax.random.normal(kx, (64, 64)), "y": jax.random.randint(ky, (64,), 0, 10)}
keys = jax.random.split(jax.random.PRNGKey(0), 8)
pv = jax.vmap(init)(keys)
sv = jax.vmap(integ.init)(pv)
step = jax.jit(jax.vmap(lambda p, s: integ.step(loss_fn, p, s, b)))
for _ in range(3):
  pv, sv, aux = step(pv, sv)
one = jax.jit(lambda p, s: integ.step(loss_fn, p, s, b))
p, s = init(keys[5]), integ.init(init(keys[5]))
for _ in range(3):
  p, s, a = one(p, s)
np.testing.assert_allclose(aux["loss"][5], a["loss"], rtol=1e-4)
print("ok", aux["loss"])
"""


@pytest.mark.tier2
def test_vmapped_adaptive_kls_step_finishes():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true")
  r = subprocess.run([sys.executable, "-c", CODE], capture_output=True,
                     text=True, cwd=ROOT, env=env, timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("ok")
