"""Which convolution routine a program gets, and where the passes of the
rank-adaptive steps run: "auto" is XLA's convolution, and on the CPU no
convolution sits inside the half-width branch of `base.at_active_width`."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import factorizations as fz
from lrtrain import integrators, layers, models
from lrtrain.factorizations import conv, lowrank
from lrtrain.integrators import base, kls


def _prims(jaxpr, inside_cond=False, out=None):
  """[(primitive name, inside a cond branch)] over a jaxpr and its sub-jaxprs."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    out.append((eqn.primitive.name, inside_cond))
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          _prims(sub, inside_cond or eqn.primitive.name == "cond", out)
  return out


def test_resolve():
  assert conv.resolve("auto") == "xla"
  assert conv.resolve("im2col") == "im2col"
  with pytest.raises(ValueError, match="conv impl"):
    conv.resolve("fft")


def _lenet(kind, impl="auto"):
  cfg = models.default_model_config()
  cfg.name, cfg.conv_impl = "lenet5", impl
  cfg.factor.kind, cfg.factor.rank, cfg.factor.clip_rank = kind, 4, True
  model = models.build(cfg, num_classes=10, input_shape=(28, 28, 1))
  x = jnp.zeros((4, 28, 28, 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean(), {}

  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1)),
           "y": jnp.arange(4)}
  return params, loss_fn, batch


@pytest.mark.parametrize("impl", ["xla", "im2col"])
def test_factored_conv_routines_agree(impl):
  params, loss_fn, batch = _lenet("lowrank", impl)
  ref_params, ref_loss, _ = _lenet("lowrank", "im2col" if impl == "xla" else "xla")
  (l1, _), g1 = base.value_and_grad(loss_fn, params, batch)
  (l2, _), g2 = base.value_and_grad(ref_loss, ref_params, batch)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_which_factored_convolutions_run_through_factors():
  """The cost rule: V's filters and a channel mix where they cost at most
  CONV_FACTORED_MAX of the formed kernel's convolution; never with a
  frozen base or for other factorizations."""
  key = jax.random.PRNGKey(0)
  conv2 = lowrank.init(key, 50, 500, 25, capacity=25)     # 0.56 of formed
  conv1 = lowrank.init(key, 20, 25, 10, capacity=10)      # 0.92
  assert lowrank.convolve_through_factors(conv2)
  assert not lowrank.convolve_through_factors(conv1)
  wide = lowrank.init(key, 50, 500, 25, capacity=50)      # 1.2
  assert not lowrank.convolve_through_factors(wide)
  based = dataclasses.replace(conv2, W0=jnp.zeros((50, 500)))
  assert not lowrank.convolve_through_factors(based)
  assert not lowrank.convolve_through_factors(jnp.zeros((50, 500)))


@pytest.mark.parametrize("strides,padding", [((1, 1), "VALID"),
                                             ((2, 2), "SAME")])
def test_convolution_through_factors_equals_the_formed_kernel(strides, padding):
  """A LowRank conv layer run through its factors: the formed kernel's
  outputs and gradients (factors and input), also vmapped over kernels."""
  layer = layers.Conv(48, (3, 3), strides=strides, padding=padding,
                      factor=layers.FactorSpec(kind="lowrank", rank=6),
                      impl="xla", use_bias=False)
  kx, kp, kg = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(kx, (2, 9, 9, 16))
  kernel = layer.init(kp, x)["params"]["kernel"]
  # A full core (not the init's diagonal one): S and S^T differ.
  kernel = dataclasses.replace(kernel, S=jax.random.normal(kg, kernel.S.shape))
  assert lowrank.convolve_through_factors(kernel)
  y = layer.apply({"params": {"kernel": kernel}}, x)
  g = jax.random.normal(kg, y.shape)

  def formed(f, x):
    w = lowrank.matrix_to_conv_kernel(fz.materialize(f), 3, 3)
    return conv.conv2d(x, w, strides, padding, "xla")

  def ours(f, x):
    return layer.apply({"params": {"kernel": f}}, x)

  def grads(fn, f, x):
    def loss(usv, x):
      return jnp.vdot(fn(dataclasses.replace(f, U=usv[0], S=usv[1],
                                             V=usv[2]), x), g)
    return jax.grad(loss, argnums=(0, 1))((f.U, f.S, f.V), x)

  np.testing.assert_allclose(y, formed(kernel, x), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads(ours, kernel, x)),
                  jax.tree.leaves(grads(formed, kernel, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
  two = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), kernel)
  np.testing.assert_allclose(jax.vmap(ours, (0, None))(two, x),
                             jax.vmap(formed, (0, None))(two, x),
                             rtol=1e-5, atol=1e-4)


def _step_prims(integ, impl="auto"):
  """LeNet5 (lowrank, resized) with routine `impl`: the primitives of
  `integ`'s step (`_prims`) and (params, loss_fn, batch)."""
  params, loss_fn, batch = _lenet("lowrank", impl)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  prims = _prims(jax.make_jaxpr(
      lambda p, s: integ.step(loss_fn, p, s, batch)[:2])(params, state).jaxpr)
  return prims, (params, loss_fn, batch)


def test_adaptive_kls_takes_one_pass_with_either_routine():
  """Rank-adaptive KLS on LeNet5 takes one pass with both routines: with
  im2col every factored kernel is applied to patches (no convolution in
  the step); with XLA's ("auto") the conv kernels are materialized and
  their gradients G come from W-shaped probes, the dense layers' from
  their inputs and output cotangents."""
  integ = integrators.build("kls", optax.sgd(0.1), adaptive=True, tau=0.1)
  prims, run = _step_prims(integ, "im2col")
  assert not [p for p, _ in prims if p == "conv_general_dilated"]
  params, loss_fn, batch = run
  uses = kls._single_inputs(loss_fn, params, batch)
  assert uses is not None and all(u is not None for u in uses)
  params, loss_fn, batch = _lenet("lowrank", "auto")
  params, _, _ = integ.resize(params, None)
  uses = kls._single_inputs(loss_fn, params, batch)
  assert uses is not None
  assert [u is None for u in uses].count(True) == 2     # conv1, conv2


@pytest.mark.parametrize("method", ["kls", "geolora"])
def test_no_convolution_inside_a_branch_on_cpu(method):
  """XLA's CPU backend runs a convolution inside a conditional without its
  fast routine (10x slower): the pass runs at full width there instead
  (rank-adaptive KLS and geolora with auto, i.e. XLA's routine)."""
  kw = dict(adaptive=True, tau=0.1) if method == "kls" else dict(tau=0.1)
  integ = integrators.build(method, optax.sgd(0.1), **kw)
  prims, _ = _step_prims(integ)
  convs = [c for p, c in prims if p == "conv_general_dilated"]
  assert convs and not any(convs)
  # Without convolutions the half-width branch is kept.
  prims, _ = _step_prims(integ, "im2col")
  assert not [p for p, _ in prims if p == "conv_general_dilated"]
  assert any(c and p == "dot_general" for p, c in prims)


_GRADS = """
import json, os, sys
import lrtrain
import jax, jax.numpy as jnp, numpy as np, optax
from lrtrain import models
cfg = models.default_model_config()
cfg.name, cfg.factor.kind = "lenet5", "dense"
model = models.build(cfg, num_classes=10, input_shape=(28, 28, 1))
x = jax.random.normal(jax.random.PRNGKey(1), (16, 28, 28, 1))
params = model.init(jax.random.PRNGKey(0), x)["params"]
loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, x), jnp.arange(16) % 10).mean()
g = jax.jit(jax.grad(loss))(params)
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""),
                  "g": [np.asarray(v).ravel().tolist() for v in jax.tree.leaves(g)]}))
"""


def _grads(**env):
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  base_env = {k: v for k, v in os.environ.items()
              if k not in ("XLA_FLAGS", "LRTRAIN_YNN_CONV")}
  r = subprocess.run([sys.executable, "-c", _GRADS], env=dict(base_env, **env),
                     capture_output=True, text=True, check=True)
  return json.loads(r.stdout.splitlines()[-1])


def test_cpu_convolutions_leave_ynnpack_and_agree_with_it():
  """Importing lrtrain adds the flag that keeps XLA's CPU convolutions off
  YNNPACK (unless the run chose its own YNN fusions or LRTRAIN_YNN_CONV=1);
  the dense LeNet5 gradients agree with XLA's default to float32 rounding."""
  import lrtrain  # pylint: disable=g-import-not-at-top
  ours = _grads()
  if not lrtrain.YNN_FLAG_KNOWN:     # a jaxlib without the flag: left alone
    assert "ynn" not in ours["flags"]
    return
  assert lrtrain.YNN_FLAG in ours["flags"]
  theirs = _grads(LRTRAIN_YNN_CONV="1")
  assert "ynn" not in theirs["flags"]
  own = "--xla_cpu_experimental_ynn_fusion_type=dot"
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  r = subprocess.run([sys.executable, "-c", "import os, lrtrain; "
                      "print(os.environ['XLA_FLAGS'])"],
                     env=dict(os.environ, XLA_FLAGS=own), capture_output=True,
                     text=True, check=True)
  assert r.stdout.strip() == own
  for a, b in zip(ours["g"], theirs["g"]):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def _convolutions(fn, *args) -> int:
  return [p for p, _ in _prims(jax.make_jaxpr(fn)(*args).jaxpr)].count(
      "conv_general_dilated")


def _lax_conv(x, k, strides, padding):
  return jax.lax.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((6, 12, 12, 5), (5, 5, 5, 7), (1, 1), "VALID"),   # LeNet5's conv2, small
    ((4, 9, 9, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((3, 10, 8, 2), (3, 2, 2, 3), (1, 2), [(2, 1), (0, 1)]),
])
def test_patch_input_gradient_matches_xla(shape, kernel, strides, padding):
  """Where the input gradient goes through patches (small layers on the
  CPU), values, both gradients, forward-mode derivatives and a vmap over
  kernels agree with XLA's own convolution and its derivatives."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  k = jax.random.normal(jax.random.PRNGKey(1), kernel) * 0.3
  b, h, w, _ = shape
  pads = conv._pads(h, w, kernel[0], kernel[1], strides, padding)
  assert conv.patch_input_gradient(shape, kernel, strides, pads)
  ours = lambda x, k: jnp.sum(jnp.sin(conv.conv2d(x, k, strides, padding)))
  ref = lambda x, k: jnp.sum(jnp.sin(_lax_conv(x, k, strides, pads)))
  # The input gradient adds no convolution to the forward one.
  assert _convolutions(jax.grad(ours), x, k) == 1
  assert _convolutions(jax.grad(ref), x, k) == 2
  for a, r in zip(jax.grad(ours, (0, 1))(x, k), jax.grad(ref, (0, 1))(x, k)):
    np.testing.assert_allclose(a, r, rtol=0, atol=2e-5 * np.abs(r).max())
  dx, dk = 0.1 * x, 0.2 * k
  np.testing.assert_allclose(jax.jvp(ours, (x, k), (dx, dk))[1],
                             jax.jvp(ref, (x, k), (dx, dk))[1], rtol=1e-5)
  ks = jnp.stack([k, -2.0 * k])
  gv = jax.vmap(jax.grad(ours), (None, 0))(x, ks)
  for i in range(2):
    r = jax.grad(ref)(x, ks[i])
    np.testing.assert_allclose(gv[i], r, rtol=0, atol=2e-5 * np.abs(r).max())


def test_patch_input_gradient_threshold():
  """Patches for the input gradient only up to PATCH_GRAD_MAX entries of
  the patch gradient (LeNet5's conv2 at batch 128: 4 Mi), XLA's routine
  above (a 3 x 3 SAME layer of 64 channels on 32 x 32 maps: 72 Mi)."""
  same = ((1, 1), (1, 1))
  assert conv.patch_input_gradient((128, 12, 12, 20), (5, 5, 20, 50), (1, 1),
                                   ((0, 0), (0, 0)))
  assert not conv.patch_input_gradient((128, 32, 32, 64), (3, 3, 64, 64),
                                       (1, 1), same)
  k = jnp.zeros((3, 3, 64, 64))
  loss = lambda x: jnp.sum(jnp.sin(conv.conv2d(x, k, padding="SAME")))
  assert _convolutions(jax.grad(loss), jnp.zeros((128, 32, 32, 64))) == 2
  assert _convolutions(jax.grad(loss), jnp.zeros((2, 32, 32, 64))) == 1
