"""Which convolution routine a program gets, and where the passes of the
rank-adaptive steps run: "auto" is XLA's convolution except under
`batched_kernels()` (vmapped seeds), and on the CPU no convolution sits
inside the half-width branch of `base.at_active_width`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrtrain import integrators, models
from lrtrain.factorizations import conv
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


def _convs(fn, *args):
  return [c for p, c in _prims(jax.make_jaxpr(fn)(*args).jaxpr)
          if p == "conv_general_dilated"]


def test_resolve():
  assert conv.resolve("auto") == "xla"
  assert conv.resolve("im2col") == "im2col"
  with conv.batched_kernels():
    assert conv.resolve("auto") == "im2col"
    assert conv.resolve("xla") == "xla"
  assert conv.resolve("auto") == "xla"
  with pytest.raises(ValueError, match="conv impl"):
    conv.resolve("fft")


def test_auto_is_xla_alone_and_im2col_under_batched_kernels():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))
  k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
  # A new function each time: a traced program is cached with its function.
  f = lambda: lambda x, k: conv.conv2d(x, k, (1, 1), "SAME")
  assert len(_convs(f(), x, k)) == 1
  y = f()(x, k)
  with conv.batched_kernels():
    assert _convs(f(), x, k) == []
    np.testing.assert_allclose(f()(x, k), y, rtol=1e-5, atol=1e-5)


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


def test_adaptive_kls_traces_auto_convolutions_as_im2col_and_takes_one_pass():
  """Rank-adaptive KLS applies factored conv kernels to patches ("auto" is
  im2col inside its step), so every node is applied once and the S
  sub-step's gradient comes from the K/L pass: no convolution and one
  value_and_grad's worth of LeNet5 forward work in the step."""
  params, loss_fn, batch = _lenet("lowrank")
  integ = integrators.build("kls", optax.sgd(0.1), adaptive=True, tau=0.1)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  prims = _prims(jax.make_jaxpr(
      lambda p, s: integ.step(loss_fn, p, s, batch)[:2])(params, state).jaxpr)
  assert not [p for p, _ in prims if p == "conv_general_dilated"]
  with conv.factored_apply():
    assert kls._single_inputs(loss_fn, params, batch) is not None
  # Outside the step "auto" is still XLA's routine.
  assert conv.resolve("auto") == "xla"


@pytest.mark.parametrize("method", ["kls", "geolora"])
def test_no_convolution_inside_a_branch_on_cpu(method):
  """XLA's CPU backend runs a convolution inside a conditional without its
  fast routine (10x slower): the pass runs at full width there instead
  (rank-adaptive KLS with an explicit xla routine; geolora with auto)."""
  params, loss_fn, batch = _lenet("lowrank", "xla" if method == "kls" else "auto")
  kw = dict(adaptive=True, tau=0.1) if method == "kls" else dict(tau=0.1)
  integ = integrators.build(method, optax.sgd(0.1), **kw)
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  convs = _convs(lambda p, s: integ.step(loss_fn, p, s, batch)[:2], params, state)
  assert convs and not any(convs)
  # Without convolutions the half-width branch is kept.
  params, loss_fn, batch = _lenet("lowrank")
  params, _, _ = integ.resize(params, None)
  state = integ.init(params)
  with conv.batched_kernels():
    prims = _prims(jax.make_jaxpr(
        lambda p, s: integ.step(loss_fn, p, s, batch)[:2])(params, state).jaxpr)
  assert not [p for p, _ in prims if p == "conv_general_dilated"]
  assert any(c and p == "dot_general" for p, c in prims)


def test_runner_traces_vmapped_seeds_under_batched_kernels(tmp_path, monkeypatch):
  """Vmapped seeds of a conv model: the step's "auto" convolutions resolve
  to im2col, each seed's evaluation (unbatched) to XLA's convolution."""
  from lrtrain import sweep, train
  seen = []
  real = conv.resolve
  monkeypatch.setattr(conv, "resolve", lambda impl: seen.append(real(impl)) or seen[-1])

  def cfg(seed):
    c = sweep.load_config_module("configs/digits.py").get_config("runlocal")
    c.model.name, c.model.factor.kind = "vgg", "dense"
    c.integrator.name, c.seed = "dense", seed
    c.train.num_steps, c.diagnostics.every = 2, 0
    return c

  train.train_seeds_vmapped([cfg(0), cfg(1)], [str(tmp_path / f"s{i}") for i in range(2)])
  assert "im2col" in seen and "xla" in seen
