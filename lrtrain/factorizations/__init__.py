"""Pure-functional factorizations of weight matrices and conv kernels.

Each factorization is a typed pytree node with array leaves only (no Flax,
no optax): `LowRank` (U S V^T in fixed-capacity buffers with an array rank),
`Lora` (frozen W0 + scale B A), `SLTrain` (scale B A + a sparse S on a
fixed support) and `Tucker` (conv kernels). The generic
functions below dispatch on the node type so layers, integrators and
diagnostics handle every kind alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lrtrain.factorizations import conv, lora, lowrank, sltrain, tucker
from lrtrain.factorizations.lora import Lora
from lrtrain.factorizations.lowrank import LowRank
from lrtrain.factorizations.sltrain import SLTrain
from lrtrain.factorizations.tucker import Tucker

FACTOR_TYPES = (LowRank, Lora, SLTrain, Tucker)
_MODULES = {LowRank: lowrank, Lora: lora, SLTrain: sltrain, Tucker: tucker}


def is_factor(x: Any) -> bool:
  """True for a factorization node (use as `is_leaf` when walking params)."""
  return isinstance(x, FACTOR_TYPES)


def _module(f):
  try:
    return _MODULES[type(f)]
  except KeyError:
    raise TypeError(f"not a factorization node: {type(f).__name__}") from None


def register(node_type: type, module: Any) -> None:
  """Register an extra node type: `module` provides apply / materialize /
  num_params for it, and `is_factor` becomes True for its instances (used
  by integrators that evaluate the model on auxiliary nodes)."""
  global FACTOR_TYPES
  _MODULES[node_type] = module
  if node_type not in FACTOR_TYPES:
    FACTOR_TYPES = FACTOR_TYPES + (node_type,)


def materialize(f) -> jax.Array:
  """Dense weight: (n, m) for LowRank/Lora/SLTrain, (c_out, c_in, kh, kw)
  for Tucker."""
  return _module(f).materialize(f)


def as_matrix(w) -> jax.Array:
  """Any kernel as an (out, in) matrix: dense Flax kernels (in, out) are
  transposed, conv kernels (kh, kw, c_in, c_out) become (c_out, kh*kw*c_in),
  Tucker kernels are materialised and reshaped the same way."""
  if isinstance(w, Tucker):
    return lowrank.conv_kernel_to_matrix(tucker.to_flax_kernel(w))
  if is_factor(w):
    return materialize(w)
  if w.ndim == 2:
    return w.T
  if w.ndim == 4:
    return lowrank.conv_kernel_to_matrix(w)
  raise ValueError(f"cannot view an array of shape {w.shape} as a weight matrix")


def apply(f, x: jax.Array) -> jax.Array:
  """x (..., m) -> (..., n) for LowRank / Lora (without forming W) and
  SLTrain."""
  if isinstance(f, Tucker):
    raise TypeError("Tucker kernels are applied with tucker.conv")
  return _module(f).apply(f, x)


def num_params(f, train: bool = True) -> jax.Array:
  """Parameter count of a node (train: trainable; eval: deployed)."""
  return _module(f).num_params(f, train)


def dense_num_params(f) -> int:
  """Parameters of the dense weight this node replaces."""
  if isinstance(f, Tucker):
    c_out, c_in, kh, kw = f.shape
    return c_out * c_in * kh * kw
  n, m = f.shape
  return n * m


def factor_paths(params) -> list[tuple[str, Any]]:
  """[(slash path, node)] of every factorization node in a params pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_factor)[0]
  return [(path_str(p), x) for p, x in leaves if is_factor(x)]


def path_str(path) -> str:
  """A key path as 'a/b/c'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


__all__ = ["LowRank", "Lora", "SLTrain", "Tucker", "FACTOR_TYPES", "is_factor",
           "materialize", "as_matrix", "apply", "num_params",
           "dense_num_params", "factor_paths", "path_str", "register", "conv",
           "lora", "lowrank", "sltrain", "tucker"]
