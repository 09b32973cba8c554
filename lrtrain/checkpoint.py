"""Checkpoints of a run with orbax's CheckpointManager (save/restore `args=`).

What a checkpoint holds (one step directory, two items):

  arrays  every array leaf of {params, opt_state, rng} in tree-flatten order
          under keys '000000', '000001', ... (StandardSave)
  meta    JSON: step, the leaf count and key paths of each group, a
          fingerprint of the config, and a digest of every array (JsonSave)

Integrity: `save` stores a blake2b digest of each array (dtype, shape and
bytes) in `meta`; `restore_leaves` recomputes them and refuses a checkpoint
whose bytes changed since (a flipped bit on disk, a partly copied file):
CheckpointError naming the step and the leaf. The runner then stops, or,
under train.restore_fallback, sets the step aside (`set_aside`) and resumes
from the newest intact earlier one with a warning. Checkpoints written
before digests existed have none in `meta`; they load unverified (with a
log line saying so) rather than being refused, since their bytes can no
longer be vouched for either way and refusing would strand those runs.

Why flat leaves: rank-adaptive methods change factor capacities between
saves, so a target built from a fresh model has the wrong shapes. The arrays
are therefore restored without a target (as saved) and put back into the
tree structure of a fresh model (structure never changes, only shapes); the
optimizer-state structure is then derived from the restored params. The key
paths stored in `meta` are compared with the rebuilt trees, so a checkpoint
of another model refuses to load instead of loading wrongly.

Resume order (train.py): validate config -> build data and model -> lock
the workdir -> refuse a workdir of another config -> latest step -> restore
params (digests checked) -> rebuild the optimizer state's structure from
them -> restore it -> data iterator at `step` (the train stream is
deterministic in (seed, step)) -> RNG.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging as py_logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

GROUPS = ("params", "opt_state", "rng")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read or does not belong to this run."""


class CorruptCheckpointError(CheckpointError):
  """A damaged checkpoint: `step` and `problem` (what is wrong, short)."""

  def __init__(self, message: str, step: int, problem: str):
    super().__init__(message)
    self.step, self.problem = step, problem


@contextlib.contextmanager
def _quiet():
  """orbax logs every save at INFO; keep run logs readable."""
  logger = py_logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, py_logging.WARNING))
  try:
    yield
  finally:
    logger.setLevel(level)


def _key(i: int) -> str:
  return f"{i:06d}"


def digest(a: Any) -> str:
  """blake2b of an array's dtype, shape and bytes (C order), hex."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    if a.sharding.is_fully_replicated:
      a = a.addressable_data(0)       # any shard is the array
    else:                             # sharded over several processes
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      a = multihost_utils.process_allgather(a, tiled=True)
  a = np.ascontiguousarray(np.asarray(a))
  h = hashlib.blake2b(digest_size=16)
  h.update(f"{a.dtype.name}{a.shape}".encode())
  h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def leaf_paths(tree: Any) -> list[str]:
  """Key paths of the array leaves of `tree` (None subtrees have none)."""
  return [jax.tree_util.keystr(p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class Checkpoints:
  """A run's checkpoints directory.

  Args:
    directory: the checkpoints/ folder (created on first save).
    max_to_keep: number of step directories kept.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max(int(max_to_keep), 1), create=True,
        enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts,
                                       item_names=("arrays", "meta"))

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, *, params: Any, opt_state: Any, rng: Any,
           fingerprint: str = "", extra: dict | None = None) -> None:
    """Write step `step` (synchronously, so it is complete on return)."""
    groups = {"params": params, "opt_state": opt_state, "rng": rng}
    arrays, meta = {}, {"step": int(step), "fingerprint": fingerprint,
                        "groups": {}, "extra": extra or {}}
    i = 0
    empty = {}   # orbax refuses zero-size arrays: their shape goes in meta
    for name in GROUPS:
      leaves = jax.tree.leaves(groups[name])
      meta["groups"][name] = {"start": i, "paths": leaf_paths(groups[name])}
      for leaf in leaves:
        if (jax.process_count() > 1 and isinstance(leaf, jax.Array)
            and leaf.is_fully_addressable):
          # A process-local array (the RNG key) is not a global array orbax
          # can save over processes: saved as numpy, by process 0.
          leaf = np.asarray(leaf)
        if np.size(leaf) == 0:
          empty[_key(i)] = [list(np.shape(leaf)), np.dtype(leaf.dtype).name]
        else:
          arrays[_key(i)] = leaf
        i += 1
    meta["num_leaves"] = i
    meta["empty"] = empty
    meta["digests"] = {k: digest(v) for k, v in arrays.items()}
    with _quiet():
      self._mngr.save(int(step), args=ocp.args.Composite(
          arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
          force=True)
      self._mngr.wait_until_finished()

  def read_meta(self, step: int) -> dict:
    """The meta item of `step`.

    Raises:
      CheckpointError: unreadable.
    """
    try:
      with _quiet():
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
      meta = out["meta"]
    except Exception as e:  # orbax raises many types for damaged files
      raise self._corrupt(step, "unreadable metadata", e) from e
    if not isinstance(meta, dict) or "groups" not in meta:
      raise self._corrupt(step, "no valid metadata")
    return meta

  def _corrupt(self, step: int, what: str,
               cause: Exception | None = None) -> CorruptCheckpointError:
    """The one-line error of a damaged checkpoint: the step, what is wrong
    and what to do."""
    if cause is not None:
      first = str(cause).splitlines()[0] if str(cause) else ""
      what += f" ({type(cause).__name__}: {first[:200]})"
    return CorruptCheckpointError(
        f"checkpoint step {step} in {self.directory} is corrupt: {what}; "
        "refusing to resume from it - rerun with "
        "--config.train.restore_fallback=True to resume from the newest "
        "intact earlier checkpoint, or delete it, or use another workdir",
        step, what)

  def restore_leaves(self, step: int) -> tuple[dict, dict[str, list]]:
    """(meta, {group: [arrays as saved]}) of `step`, host numpy arrays.

    Raises:
      CheckpointError: unreadable or incomplete checkpoint.
    """
    meta = self.read_meta(step)
    try:
      with _quiet():
        out = self._mngr.restore(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(self._target(step))))
      arrays = out["arrays"]
    except Exception as e:
      raise self._corrupt(step, "unreadable arrays", e) from e
    n = meta.get("num_leaves", -1)
    empty = meta.get("empty", {})
    arrays = {k: np.asarray(v) for k, v in dict(arrays).items()}
    for k, (shape, dtype) in empty.items():
      arrays.setdefault(k, np.zeros(shape, jax.numpy.dtype(dtype)))
    if len(arrays) != n or any(_key(i) not in arrays for i in range(n)):
      raise self._corrupt(step, f"{len(arrays) - len(empty)} arrays and "
                          f"{len(empty)} empty ones, metadata says {n}")
    digests = meta.get("digests")
    if digests is None:
      logging.warning("checkpoint step %d in %s has no array digests (written "
                      "before they existed): loaded unverified", step,
                      self.directory)
    groups = {}
    for name in GROUPS:
      g = meta["groups"][name]
      groups[name] = []
      for j, path in enumerate(g["paths"]):
        k = _key(g["start"] + j)
        if digests is not None and k in digests and digest(arrays[k]) != digests[k]:
          raise self._corrupt(step, f"{name}{path} does not match the digest "
                              "saved with it")
        groups[name].append(arrays[k])
    return meta, groups

  def _target(self, step: int) -> dict:
    """The saved arrays' shapes and dtypes, each replicated over this
    process's devices: a checkpoint written on another mesh or device count
    (8 devices, restored on 4 or 1) reads back whole; the caller places the
    arrays by its own mesh's rules."""
    md = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(int(step)) / "arrays")
    rep = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
        jax.sharding.PartitionSpec())
    return {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep)
            for k, m in dict(md).items()}

  def set_aside(self, step: int) -> str:
    """Move a corrupt step out of the managed steps (to
    `corrupt_step_<step>` beside them; kept for inspection) so the run can
    resume from an earlier one and later save this step again. Returns the
    new path."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt_step_{step}")
    n = 1
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(self.directory, f"corrupt_step_{step}.{n}")
    os.rename(src, dst)
    self._mngr.reload()
    return dst

  def close(self) -> None:
    self._mngr.close()


def rebuild(like: Any, leaves: list, saved_paths: list[str], what: str) -> Any:
  """Put restored leaves into the tree structure of `like` (shapes may
  differ from `like`'s: capacities change during training).

  Raises:
    CheckpointError: the structures differ (a checkpoint of another model).
  """
  paths = leaf_paths(like)
  if paths != list(saved_paths):
    missing = sorted(set(paths) ^ set(saved_paths))[:3]
    raise CheckpointError(f"checkpoint {what} do not match this model "
                          f"({len(saved_paths)} saved leaves vs {len(paths)}; "
                          f"differing: {missing})")
  treedef = jax.tree.structure(like)
  return jax.tree.unflatten(treedef, list(leaves))
