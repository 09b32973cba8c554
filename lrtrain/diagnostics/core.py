"""`Diagnostics`: params (+ a cached reference) -> flat dict of named metrics.

One jitted function per parameter structure computes every metric of every
layer; layers of the same kind and shapes are stacked and go through one
vmapped (batched) SVD. The reference's left singular vectors are computed
once, at construction. Keys are documented in docs/diagnostics.md.

A layer is every factorization node and every dense leaf named `kernel`
(2-D Flax kernels (in, out), 3-D attention kernels, 4-D conv kernels
(kh, kw, c_in, c_out)); its name is the param path without '/kernel'.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrtrain import factorizations as fz
from lrtrain import lapack
from lrtrain.diagnostics import heavy_tail as ht
from lrtrain.diagnostics import intruders as intr
from lrtrain.diagnostics import spectral as sp
from lrtrain.factorizations import Lora, LowRank, Tucker


def layer_matrix(name: str, w: jax.Array) -> jax.Array:
  """A dense kernel as an (out, in) matrix.

  (in, out) Flax kernels are transposed; conv kernels (kh, kw, c_in, c_out)
  become (c_out, kh*kw*c_in); 3-D attention kernels (DenseGeneral) are
  (d, heads, head_dim) -> (heads*head_dim, d) for the projections in, and
  (heads, head_dim, d) -> (d, heads*head_dim) for a layer named '.../out'.

  Raises:
    ValueError: an array that is not 2-, 3- or 4-D.
  """
  if w.ndim == 2:
    return w.T
  if w.ndim == 4:
    return fz.lowrank.conv_kernel_to_matrix(w)
  if w.ndim == 3:
    if name.rsplit("/", 1)[-1] == "out":
      return w.reshape(-1, w.shape[-1]).T
    return w.reshape(w.shape[0], -1).T
  raise ValueError(f"layer {name!r}: cannot view a kernel of shape {w.shape} "
                   "as a weight matrix")


def layer_name(path: str, x) -> str | None:
  """The layer name of the params leaf (or factor node) x at slash path
  `path`, None if x is no layer (module docstring)."""
  is_kernel = path == "kernel" or path.endswith("/kernel")
  if fz.is_factor(x) or (is_kernel and getattr(x, "ndim", 0) in (2, 3, 4)):
    return path.removesuffix("/kernel")
  return None


def find_layers(params) -> list[tuple[str, Any]]:
  """[(layer name, node or dense kernel)] in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=fz.is_factor)[0]
  named = [(layer_name(fz.path_str(path), x), x) for path, x in leaves]
  return [(name, x) for name, x in named if name is not None]


def _as_matrix(name: str, x) -> jax.Array:
  return fz.as_matrix(x) if fz.is_factor(x) else layer_matrix(name, x)


def _shape(x) -> tuple[int, int]:
  """(n, m) of a node or an (out, in) matrix."""
  if isinstance(x, Tucker):
    c_out, c_in, kh, kw = x.shape
    return c_out, c_in * kh * kw
  return tuple(x.shape)


def _stack(items):
  return jax.tree.map(lambda *a: jnp.stack(a), *items)


class Diagnostics:
  """Spectral, intruder, heavy-tail and parameter-count metrics of a model.

  Usage:
    diag = Diagnostics(params_at_start)      # reference SVDs cached here
    metrics = diag(params)                   # {key: float | int | np.ndarray}

  Args:
    reference_params: params pytree of the reference (pre-trained or initial
      weights); layers are matched by name. None: no intruder/subspace keys.
    top_k: k of the logged top-k vectors (sv, maxsim, cos_angles).
    eps: intruder threshold on the maximum absolute cosine.
    full_spectrum: also log spectral/<layer>/sv_full (all min(n, m) values).
    heavy_tail: fit power-law alphas for layers with >= 50 eigenvalues.
    layers: names or fnmatch patterns of the layers examined for intruders
      and subspace similarity (default: every layer of the reference).
    dense_svd_limit: adapters (Lora, LowRank with a base W0) whose min(n, m)
      exceeds this get their top-k vectors of W0 + update by randomised range
      finding instead of a dense SVD of the merged matrix.
    power_iters: subspace iterations of that range finder.
    rtol: numerical-rank tolerance relative to s_1 (default max(n, m) eps).

  References:
    Shuttleworth et al., 2024 (intruder dimensions); Hu et al., 2022 (phi);
    Roy & Vetterli, 2007 (effective rank); Martin & Mahoney, 2021 (alpha).
  """

  def __init__(self, reference_params=None, *, top_k: int = 10, eps: float = 0.5,
               full_spectrum: bool = False, heavy_tail: bool = True,
               layers: Sequence[str] | None = None, dense_svd_limit: int = 512,
               power_iters: int = 2, rtol: float | None = None):
    if top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {top_k}")
    self.top_k = int(top_k)
    self.eps = float(eps)
    self.full_spectrum = bool(full_spectrum)
    self.heavy_tail = bool(heavy_tail)
    self.dense_svd_limit = int(dense_svd_limit)
    self.power_iters = int(power_iters)
    self.rtol = rtol
    self.num_traces = 0
    self._refs = self._reference_bases(reference_params, layers)
    self._jit = jax.jit(self._compute)

  @property
  def examined(self) -> list[str]:
    """Names of the layers with a cached reference."""
    return list(self._refs)

  def _reference_bases(self, params, patterns):
    self._ref_shapes = {}
    if params is None:
      return {}
    chosen = [(name, x) for name, x in find_layers(params)
              if patterns is None
              or any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    names = [name for name, _ in chosen]
    # One program for every layer's matrix (op by op, a Tucker layer's mode
    # products compiled one small program each).
    as_matrices = jax.jit(lambda xs: [
        jnp.asarray(_as_matrix(n, x), jnp.float32) for n, x in zip(names, xs)])
    mats = dict(zip(names, as_matrices([x for _, x in chosen])))
    groups = defaultdict(list)
    for name, W in mats.items():
      groups[W.shape].append(name)
      self._ref_shapes[name] = tuple(W.shape)
    basis = jax.jit(jax.vmap(intr.reference_basis))
    refs = {}
    for names in groups.values():
      X, xmask, _ = basis(jnp.stack([mats[n] for n in names]))
      for i, n in enumerate(names):
        refs[n] = (X[i], xmask[i])
    return {n: refs[n] for n in mats}

  def compute(self, params) -> dict[str, jax.Array]:
    """The metrics as device arrays (one jitted call)."""
    return self._jit(params, self._refs)

  def __call__(self, params) -> dict[str, Any]:
    """The metrics on the host: 0-d values as Python floats/ints, vectors as
    numpy arrays."""
    out = jax.device_get(self.compute(params))
    return {k: (v.item() if np.ndim(v) == 0 else np.asarray(v))
            for k, v in out.items()}

  # -- traced -----------------------------------------------------------------

  def _compute(self, params, refs):
    self.num_traces += 1
    groups = defaultdict(list)
    for name, x in find_layers(params):
      if isinstance(x, fz.SLTrain):
        x = fz.materialize(x)     # B A + S has no cheap factored spectrum
      elif not fz.is_factor(x):
        x = layer_matrix(name, x)
      ref = refs.get(name)
      if ref is not None and self._ref_shapes[name] != _shape(x):
        raise ValueError(f"layer {name!r}: the reference and the current "
                         f"weight differ in (out, in) shape: "
                         f"{self._ref_shapes[name]} vs {_shape(x)}")
      leaves, treedef = jax.tree.flatten(x)
      key = (treedef, tuple((l.shape, l.dtype) for l in leaves), ref is not None)
      groups[key].append((name, x, ref))
    out = {}
    for (_, _, has_ref), items in groups.items():
      xs = _stack([x for _, x, _ in items])
      rs = _stack([r for _, _, r in items]) if has_ref else None
      res = jax.vmap(self._layer)(xs, rs)
      for i, (name, _, _) in enumerate(items):
        for metric, v in res.items():
          ns, _, rest = metric.partition("/")
          out[f"{ns}/{name}/{rest}" if rest else f"{ns}/{name}"] = v[i]
    if refs:
      counts = [v for k, v in out.items()
                if k.startswith("intruders/") and k.endswith("/count")]
      out["intruders/total"] = (sum(counts) if counts
                                else jnp.zeros((), jnp.int32))
    out.update(_param_counts(params))
    return dict(sorted(out.items()))

  def _layer(self, x, ref) -> dict[str, jax.Array]:
    """Every metric of one layer ('<namespace>/<metric>' keys)."""
    k, vec = self.top_k, ref is not None
    n, m = _shape(x)
    p = min(n, m)
    res = {}
    adapter = isinstance(x, Lora) or (isinstance(x, LowRank) and x.W0 is not None)
    Y = ymask = None
    if isinstance(x, LowRank):
      s, active, Y = sp.lowrank_spectrum(x, vec and x.W0 is None)
      ymask = active
      res["spectral/kappa_S_log10"] = sp.kappa_S_log10(x)
    elif isinstance(x, Lora):
      s = sp.lora_spectrum(x)
      active = jnp.ones(s.shape, bool)
    elif isinstance(x, Tucker):
      s, active, Y, modes = sp.tucker_spectra(x, vec)
      ymask = active
      for i, mode_s in enumerate(modes):
        res[f"tucker/mode{i + 1}_sv"] = mode_s
    else:
      s, Y = sp.dense_spectrum(x, vec)
      active = jnp.ones(s.shape, bool)
      ymask = active
    s = jnp.where(active, s, 0.0)
    for name, v in sp.spectrum_metrics(s, active, (n, m), self.rtol).items():
      res[f"spectral/{name}"] = v
    res["spectral/sv"] = sp.pad_top(s, k, p)
    if self.full_spectrum:
      res["spectral/sv_full"] = sp.pad_top(s, p, p)
    if self.heavy_tail and s.shape[0] >= ht.MIN_EIGENVALUES:
      fit = ht.powerlaw_alpha(s * s)
      for name in ("alpha", "alpha_weighted", "log_spectral_norm"):
        res[f"heavytail/{name}"] = fit[name]
    if vec:
      X, xmask = ref
      if adapter:
        s_t, Y = self._adapter_top(x, X)
        ymask = jnp.ones(s_t.shape, bool)
      else:
        s_t = s
      ms = intr.maxsim(X, xmask, Y, ymask, k)
      res["intruders/maxsim"] = ms
      res["intruders/count"] = intr.count(ms, self.eps)
      res["intruders/sv"] = sp.pad_top(jnp.where(ymask, s_t, 0.0), k, p)
      phi, cos = sp.subspace_similarity(X, xmask, Y, ymask, k)
      res["subspace/phi"] = phi
      res["subspace/cos_angles"] = cos
    return res

  def _adapter_top(self, x, X):
    """Top singular values and left vectors of the merged W0 + update."""
    n, m = x.shape
    if min(n, m) <= self.dense_svd_limit:
      U, s, _ = lapack.svd(fz.materialize(x), full_matrices=False)
      kk = min(self.top_k, s.shape[0])
      return s[:kk], U[:, :kk]
    Qb, K, Qa = sp.lora_core(x) if isinstance(x, Lora) else sp.lowrank_core(x)
    q = min(X.shape[1], self.top_k + 10)
    return sp.adapter_top_left(x.W0, Qb, K, Qa, X[:, :q], self.top_k,
                               self.power_iters)


def _param_counts(params) -> dict[str, jax.Array]:
  """params/<layer>/{train,eval,dense} and model totals.

  Factor nodes count their own train/eval parameters (a frozen base W0 is not
  trained but is deployed); every other float leaf counts fully in all three.
  """
  layer_names = {id(x): name for name, x in find_layers(params)}
  leaves = jax.tree_util.tree_flatten(params, is_leaf=fz.is_factor)[0]
  out, tot = {}, {"train": 0, "eval": 0, "dense": 0}
  for x in leaves:
    if fz.is_factor(x):
      c = {"train": fz.num_params(x, True), "eval": fz.num_params(x, False),
           "dense": fz.dense_num_params(x)}
    elif hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      c = dict.fromkeys(("train", "eval", "dense"), int(np.prod(x.shape)))
    else:
      continue
    c = {key: jnp.asarray(v, jnp.int32) for key, v in c.items()}
    name = layer_names.get(id(x))
    if name is not None:
      for key, v in c.items():
        out[f"params/{name}/{key}"] = v
    for key in tot:
      tot[key] = tot[key] + c[key]
  for key, v in tot.items():
    out[f"params/{key}"] = jnp.asarray(v, jnp.int32)
  dense = jnp.maximum(tot["dense"], 1).astype(jnp.float32)
  out["params/compression"] = 1.0 - tot["eval"] / dense
  out["params/train_compression"] = 1.0 - tot["train"] / dense
  return out
