"""Start a run from another run's weights (`config.model.init_from`).

Fine-tuning in lrtrain is two runs: one trains a model (usually with dense
kernels) on task A; a second names that run's workdir in
`model.init_from` and trains on task B from its weights. The second run's
own factorization decides what starts from where, layer by layer (matched
by parameter path; W is the pretrained kernel as an (out, in) matrix,
whatever its kind):

  this run's layer                         its initial value
  dense kernel                             W (in the Flax layout)
  Lora                                     W0 = W, A kept, B = 0
  LowRank, model.factor.adapter = True     W0 = W frozen, S = 0, U and V the
                                           top-r singular subspaces of W
                                           (GeoLoRA's fine-tuning start)
  LowRank, model.factor.adapter = False    truncated SVD of W at rank r
  Tucker                                   truncated HOSVD of the kernel
  SLTrain                                  refused (a pretraining method)
  any other leaf (bias, embedding, norm)   copied

Ranks and buffer capacities are this run's (model.factor.*). A layer whose
pretrained shape differs (another width, another class count) is refused
with its path and both shapes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lrtrain import checkpoint as ckpt_lib
from lrtrain import factorizations as fz
from lrtrain.factorizations import lora, lowrank, tucker


class PretrainedError(ValueError):
  """A model.init_from run that cannot start this one."""


def _fail(msg: str):
  raise PretrainedError(f"model.init_from: {msg}")


def restore_params(run_dir: str, like_params: Any) -> Any:
  """Params of the latest checkpoint of `run_dir` in the tree structure of
  `like_params` (a params tree of the same model; shapes may differ).

  Raises:
    CheckpointError: no checkpoint, unreadable, or another model's.
  """
  ck = ckpt_lib.Checkpoints(os.path.join(run_dir, "checkpoints"))
  try:
    step = ck.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no checkpoint in {run_dir}")
    meta, leaves = ck.restore_leaves(step)
  finally:
    ck.close()
  p = ckpt_lib.rebuild(like_params, leaves["params"],
                       meta["groups"]["params"]["paths"], "params")
  return jax.tree.map(jnp.asarray, p)


def load(run_dir: str, num_classes: int, input_shape: tuple
         ) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of a run: its config.json, and the params of its
  latest checkpoint in the structure of its model (built from that config
  with this run's class count and input shape: the structure does not
  depend on them, the restored arrays keep their saved shapes).

  Raises:
    PretrainedError: not a run directory, or no usable checkpoint.
  """
  from lrtrain import models  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    _fail(f"{run_dir} is not a run directory (no config.json); give the "
          "workdir of a trained run")
  with open(path) as fh:
    config = ml_collections.ConfigDict(json.load(fh))
  model = models.build(config.model, num_classes=num_classes,
                       input_shape=tuple(input_shape))
  like = jax.eval_shape(lambda: models.init_params(
      model, jax.random.key(0), tuple(input_shape)))
  try:
    return config, restore_params(run_dir, like)
  except ckpt_lib.CheckpointError as e:
    _fail(f"{e} (train that run with checkpoints first)")


def _as_flax(W: jax.Array, like: jax.Array) -> jax.Array:
  """An (out, in) matrix back in the layout of a dense kernel `like`."""
  if like.ndim == 2:
    return W.T
  kh, kw = like.shape[:2]
  return lowrank.matrix_to_conv_kernel(W, kh, kw)


def _start(path: str, init: Any, w: Any, adapter: bool) -> Any:
  """This layer's initial value from the pretrained value `w`."""
  if isinstance(init, tucker.Tucker):
    kernel = (tucker.to_flax_kernel(w) if isinstance(w, tucker.Tucker)
              else w if not fz.is_factor(w) else None)
    if kernel is None or tuple(init.shape) != (kernel.shape[3], kernel.shape[2],
                                               kernel.shape[0], kernel.shape[1]):
      _fail(f"layer {path}: a Tucker layer of shape {init.shape} cannot start "
            f"from a pretrained {type(w).__name__} of shape "
            f"{getattr(w, 'shape', None)}")
    return tucker.from_dense(kernel.astype(init.core.dtype),
                             [int(r) for r in np.asarray(init.ranks)],
                             capacities=[u.shape[1] for u in init.factors])
  if isinstance(init, fz.SLTrain):
    _fail(f"layer {path}: SLTrain layers (model.factor.kind='sltrain') train "
          "from their own initialisation; start from no run (model.init_from="
          "'') or choose another model.factor.kind")
  W = fz.as_matrix(w)
  if fz.is_factor(init):
    want = tuple(init.shape)
  else:
    want = tuple(fz.as_matrix(jnp.zeros(init.shape, init.dtype)).shape)
  if tuple(W.shape) != want:
    _fail(f"layer {path}: shape {want} here, {tuple(W.shape)} in the "
          "pretrained run (the two models must have the same layer sizes)")
  if isinstance(init, lora.Lora):
    return lora.Lora(W.astype(init.W0.dtype), init.A, init.B, init.scale)
  if isinstance(init, lowrank.LowRank):
    f = lowrank.from_dense(W.astype(init.U.dtype), int(init.rank),
                           capacity=init.capacity, frozen_base=adapter)
    return f
  return _as_flax(W, init).astype(init.dtype)


def adapt(init_params: Any, pretrained: Any, *, adapter: bool = False) -> Any:
  """This model's initial params from another model's trained ones (the
  table of the module docstring), matched by path.

  Raises:
    PretrainedError: a layer missing from the pretrained params, or of
      another shape.
  """
  flat = {fz.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      pretrained, is_leaf=fz.is_factor)[0]}

  def fn(path, x):
    key = fz.path_str(path)
    if key not in flat:
      _fail(f"layer {key} of this model is not in the pretrained run "
            f"(it has {', '.join(sorted(flat)[:6])}...)")
    w = flat[key]
    if fz.is_factor(x) or (fz.is_factor(w) and not fz.is_factor(x)):
      return _start(key, x, w, adapter)
    if tuple(np.shape(w)) != tuple(np.shape(x)):
      _fail(f"parameter {key}: shape {tuple(np.shape(x))} here, "
            f"{tuple(np.shape(w))} in the pretrained run")
    # A copy: the runner donates its initial params to the first step.
    return jnp.array(w, dtype=x.dtype, copy=True)
  return jax.tree_util.tree_map_with_path(fn, init_params, is_leaf=fz.is_factor)


def start(config: ml_collections.ConfigDict, init_params: Any,
          num_classes: int, input_shape: tuple) -> Any:
  """`adapt(init_params, load(config.model.init_from, ...))` with the
  config's adapter choice."""
  _, pre = load(config.model.init_from, num_classes, input_shape)
  return adapt(init_params, pre, adapter=bool(config.model.factor.adapter))
