"""The device mesh of a run and where each array lives on it.

A run's devices form one `jax.sharding.Mesh` of shape (data, model) with
axes named "data" and "model" (`config.mesh`; data=-1 takes every device
the model axis leaves, the default data=-1, model=1 is plain data
parallelism: every parameter replicated, the batch split over all
devices). XLA's SPMD partitioner does the rest: the step is one jitted
program whose inputs carry these shardings, and whose outputs are
constrained back to them (`Placement.constrain`), so the layout is the
same before and after every step.

Rules, by parameter kind (the axis named is the one split over "model";
an axis whose size the model axis does not divide stays whole, i.e. the
array is replicated):

  LowRank U (n, C), V (m, C)   rows (n, m): the tall factors, whose
                               products with the batch and the Gram
                               matrices X^T X are local matmuls plus an
                               all-reduce of a small (b, C) / (C, C) result.
  LowRank W0 (n, m)            rows (frozen base of an adapter).
  LowRank S (C, C), rank       replicated (small).
  Lora W0 (n, m), B (n, r)     rows (the output features, so W0 and the
                               update B A split the same way).
  Lora A (r, m), scale         replicated (A is small; splitting m as
                               well would need a reduction per product
                               for no saving that matters).
  Tucker (all leaves)          replicated: conv factors are small and the
                               HOSVD steps have not been checked sharded.
  other kernels (ndim >= 2)    the last axis (Flax's output features:
                               (in, out) dense, (kh, kw, in, out) conv).
  biases, scalars, int leaves  replicated.

Optimizer state: a leaf inside a factor node of the state tree (optax
moments mirror the params) follows that node's rule; any other leaf takes
the sharding of the parameter leaves of its shape when they all agree (the
moments of K = U S and L = V S^T in KLS, of dense kernels), and is
replicated otherwise (counts, hyperparameters, ambiguous shapes).

The batch's leading axis is split over "data" (replicated over "model").
Under vmapped seeds every array has a leading seed axis, left whole.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lrtrain import factorizations as fz

AXES = ("data", "model")


def default_config() -> ml_collections.ConfigDict:
  """config.mesh: the axis sizes (data=-1: all devices the model axis
  leaves)."""
  c = ml_collections.ConfigDict()
  c.data = -1                       # data-parallel axis (-1: the rest)
  c.model = 1                       # axis the factors' rows are split over
  return c


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, model) of `mesh_config` on `num_devices` devices.

  Raises:
    ValueError: sizes below 1 (data may be -1), or a product that does not
      divide the device count; the message names the fields.
  """
  data, model = int(mesh_config.data), int(mesh_config.model)
  if model < 1 or not (data == -1 or data >= 1):
    raise ValueError(f"mesh.data={data}, mesh.model={model}: sizes must be "
                     ">= 1 (mesh.data may be -1: all remaining devices)")
  if data == -1:
    if num_devices % model:
      raise ValueError(f"mesh.model={model} must divide the number of "
                       f"devices ({num_devices}); set mesh.model to a divisor")
    data = num_devices // model
  if num_devices % (data * model):
    raise ValueError(f"mesh.data={data} x mesh.model={model} = {data * model} "
                     f"must divide the number of devices ({num_devices})")
  if data * model != num_devices and jax.process_count() > 1:
    raise ValueError(f"mesh.data={data} x mesh.model={model} must use all "
                     f"{num_devices} devices of a multi-process run")
  return data, model


def make_mesh(mesh_config=None) -> Mesh:
  """The (data, model) mesh of `mesh_config` (None: the default) over the
  first data * model devices; the model axis runs over neighbouring
  devices (within a host where it fits)."""
  devices = jax.devices()
  data, model = mesh_shape(mesh_config or default_config(), len(devices))
  grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
  return Mesh(grid, AXES)


# --------------------------------------------------------------------------
# The rules.
# --------------------------------------------------------------------------

ROWS, LAST, REPL = "rows", "last", "replicated"

# Factor node type name -> {field: rule}; fields not named are replicated.
NODE_RULES = {
    "LowRank": {"U": ROWS, "V": ROWS, "W0": ROWS},
    "Lora": {"W0": ROWS, "B": ROWS},
    "Tucker": {},
}


def _spec(shape, rule: str, model: int, lead: int) -> P:
  """The PartitionSpec of an array of `shape` (its first `lead` axes are
  seed axes, left whole) under `rule`."""
  core = shape[lead:]
  none = (None,) * lead
  if model == 1 or rule == REPL or not core:
    return P()
  axis = 0 if rule == ROWS else len(core) - 1
  if core[axis] % model:
    return P()
  spec = [None] * len(core)
  spec[axis] = "model"
  return P(*none, *spec)


def _field(key) -> str:
  return getattr(key, "name", getattr(key, "key", ""))


def _node_specs(node, model: int, lead: int):
  """Specs of a factor node's leaves (same node type)."""
  rules = NODE_RULES.get(type(node).__name__, {})
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _spec(np.shape(x), rules.get(_field(path[-1]), REPL),
                            model, lead), node)


def _leaf_rule(x) -> str:
  """The rule of an array leaf outside factor nodes."""
  dtype = getattr(x, "dtype", None)
  floating = dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)
  return LAST if floating and np.ndim(x) >= 2 else REPL


def param_specs(params, model: int, lead: int = 0):
  """PartitionSpecs of a params tree (same structure) under the rules."""
  def one(x):
    if fz.is_factor(x):
      return _node_specs(x, model, lead)
    return _spec(np.shape(x), _leaf_rule(x), model, lead)
  return jax.tree.map(one, params, is_leaf=fz.is_factor)


def state_specs(params, specs, state, model: int, lead: int = 0):
  """PartitionSpecs of an optimizer state for params with `specs`: factor
  nodes by their rules, other leaves by the params' shape -> spec map
  (replicated where the shape is not a param's or its specs disagree)."""
  by_shape: dict[tuple, Any] = {}
  for x, s in zip(jax.tree.leaves(params),
                  jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    shape = tuple(np.shape(x))
    by_shape[shape] = s if by_shape.get(shape, s) == s else P()

  def one(x):
    if fz.is_factor(x):
      return _node_specs(x, model, lead)
    return by_shape.get(tuple(np.shape(x)), P())
  return jax.tree.map(one, state, is_leaf=fz.is_factor)


class Placement:
  """The rules on one mesh: shardings of params, optimizer state, batch.

  Args:
    mesh: a Mesh with axes ("data", "model").
  """

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.data_size = mesh.shape["data"]
    self.model_size = mesh.shape["model"]

  def _named(self, specs):
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                        is_leaf=lambda s: isinstance(s, P))

  def shardings(self, params, state=None, lead: int = 0):
    """(params shardings, state shardings or None) for these shapes."""
    ps = param_specs(params, self.model_size, lead)
    ss = (None if state is None else
          state_specs(params, ps, state, self.model_size, lead))
    return self._named(ps), (None if ss is None else self._named(ss))

  def place(self, params, state=None, lead: int = 0):
    """(params, state) moved to their shardings (state may be None)."""
    ps, ss = self.shardings(params, state, lead)
    params = jax.device_put(params, ps)
    return params, (None if state is None else jax.device_put(state, ss))

  def constrain(self, params, state=None, lead: int = 0):
    """`place` inside a jitted function (with_sharding_constraint)."""
    ps, ss = self.shardings(params, state, lead)
    params = jax.lax.with_sharding_constraint(params, ps)
    if state is None:
      return params, None
    return params, jax.lax.with_sharding_constraint(state, ss)

  def batch_sharding(self, seed_axis: bool = False) -> NamedSharding:
    """The batch axis (axis 1 under a seed axis) over "data"."""
    return NamedSharding(self.mesh, P(None, "data") if seed_axis else P("data"))

  def describe(self) -> dict[str, int]:
    """{"data": ..., "model": ...} (summary.json)."""
    return {"data": int(self.data_size), "model": int(self.model_size)}

