"""Diagnostics against numpy references on matrices with known spectra."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from lrtrain import factorizations as fz
from lrtrain.diagnostics import Diagnostics, count_from_maxsim, layer_matrix
from lrtrain.diagnostics.heavy_tail import powerlaw_alpha


def orth(rng, n, p):
  q, r = np.linalg.qr(rng.standard_normal((n, p)))
  return q * np.sign(np.diag(r))


def known(n, m, s, seed=0):
  """(n, m) float64 matrix with singular values s and its left/right bases."""
  rng = np.random.default_rng(seed)
  p = min(n, m)
  s = np.zeros(p) if s is None else np.asarray(s, np.float64)
  U, V = orth(rng, n, p), orth(rng, m, p)
  return U @ np.diag(s) @ V.T, U, V


def dense_params(W, name="fc1"):
  """Flax layout: the (out, in) matrix is stored as an (in, out) kernel."""
  return {name: {"kernel": jnp.asarray(W.T, jnp.float32)}}


def ref_metrics(s, n, m):
  s = np.asarray(s, np.float64)
  p = s / s.sum()
  p = p[p > 0]
  return {
      "stable_rank": (s ** 2).sum() / s[0] ** 2,
      "effective_rank": np.exp(-(p * np.log(p)).sum()),
      "norm_spectral": s[0],
      "norm_frobenius": np.sqrt((s ** 2).sum()),
      "norm_nuclear": s.sum(),
  }


def rel(a, b):
  return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


# --- spectral metrics ---------------------------------------------------------


@pytest.mark.parametrize("n,m,seed", [(48, 32, 0), (24, 40, 1)])
def test_dense_metrics_exact_on_known_spectrum(n, m, seed):
  p = min(n, m)
  s = np.sort(np.random.default_rng(seed).uniform(0.3, 3.0, p))[::-1]
  W, _, _ = known(n, m, s, seed)
  out = Diagnostics(None, heavy_tail=False)(dense_params(W))
  for key, v in ref_metrics(s, n, m).items():
    assert rel(out[f"spectral/fc1/{key}"], v) < 1e-5, key
  assert rel(10 ** out["spectral/fc1/kappa_log10"], s[0] / s[-1]) < 1e-5
  assert out["spectral/fc1/numerical_rank"] == p
  np.testing.assert_allclose(out["spectral/fc1/sv"], s[:10], rtol=1e-5)


def test_numerical_rank_rtol_rule():
  n, m = 40, 30
  s = np.r_[np.linspace(4.0, 1.0, 17), np.zeros(13)]
  W, _, _ = known(n, m, s, 3)
  out = Diagnostics(None, heavy_tail=False)(dense_params(W))
  W32 = np.asarray(W, np.float32)
  assert out["spectral/fc1/numerical_rank"] == 17 == np.linalg.matrix_rank(W32)
  # s_min over the whole dense spectrum is rounding noise: kappa ~ 1 / eps.
  assert out["spectral/fc1/kappa_log10"] > 5
  ref = ref_metrics(s, n, m)
  assert rel(out["spectral/fc1/effective_rank"], ref["effective_rank"]) < 1e-5
  assert rel(out["spectral/fc1/stable_rank"], ref["stable_rank"]) < 1e-5


def test_conv_kernel_is_reshaped_out_by_patch():
  k = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
  out = Diagnostics(None)({"conv1": {"kernel": jnp.asarray(k)}})
  s = np.linalg.svd(k.reshape(-1, 8).T.astype(np.float64), compute_uv=False)
  np.testing.assert_allclose(out["spectral/conv1/sv"][:8], s, rtol=1e-5)
  assert np.isnan(out["spectral/conv1/sv"][8:]).all()   # only 8 exist


def test_attention_kernels_as_matrices():
  w = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
  assert layer_matrix("attn/query", w).shape == (12, 2)
  assert layer_matrix("attn/out", w).shape == (4, 6)


def test_effective_rank_is_nan_for_a_zero_update():
  W0, _, _ = known(20, 16, np.linspace(2, 1, 16))
  lora = fz.lora.init(jax.random.PRNGKey(0), jnp.asarray(W0, jnp.float32), 4)
  out = Diagnostics(None)({"fc": {"kernel": lora}})
  assert np.isnan(out["spectral/fc/effective_rank"])
  assert out["spectral/fc/numerical_rank"] == 0


# --- factored == dense --------------------------------------------------------


def _compare_spectral(a, b, la, lb, kappa=True):
  for key in ("stable_rank", "effective_rank", "norm_spectral", "norm_frobenius",
              "norm_nuclear", "numerical_rank") + (("kappa_log10",) if kappa else ()):
    assert rel(a[f"spectral/{la}/{key}"], b[f"spectral/{lb}/{key}"]) < 1e-4, key
  np.testing.assert_allclose(a[f"spectral/{la}/sv"], b[f"spectral/{lb}/sv"],
                             rtol=1e-4, atol=1e-5)


def test_lowrank_equals_dense_with_masked_capacity():
  n, m, r, C = 30, 24, 5, 8
  key = jax.random.PRNGKey(1)
  f = fz.lowrank.init(key, n, m, r, capacity=C, scale=2.0)
  # Break orthonormality of the active columns (plain-optax 'factors' runs do).
  mask = fz.lowrank.column_mask(f.rank, C)
  U = (f.U + 0.1 * jax.random.normal(jax.random.PRNGKey(2), f.U.shape)) * mask
  S = f.S + 0.3 * jnp.triu(jnp.ones((C, C))) * mask[:, None] * mask[None, :]
  f = fz.LowRank(U, S, f.V, f.rank)
  W = np.asarray(fz.materialize(f), np.float64)
  Wref, _, _ = known(n, m, np.linspace(3, 1, min(n, m)), 5)
  ref = {"fc": {"kernel": jnp.asarray(Wref.T, jnp.float32)},
         "dn": {"kernel": jnp.asarray(Wref.T, jnp.float32)}}
  diag = Diagnostics(ref, heavy_tail=False)
  out = diag({"fc": {"kernel": f}, "dn": {"kernel": jnp.asarray(W.T, jnp.float32)}})
  _compare_spectral(out, out, "fc", "dn", kappa=False)
  s = np.linalg.svd(W, compute_uv=False)
  assert rel(10 ** out["spectral/fc/kappa_log10"], s[0] / s[r - 1]) < 1e-4
  assert out["spectral/dn/kappa_log10"] > 4   # the dense view sees zeros
  sS = np.linalg.svd(np.asarray(S)[:r, :r], compute_uv=False)
  assert rel(10 ** out["spectral/fc/kappa_S_log10"], sS[0] / sS[-1]) < 1e-4
  assert not any(k.startswith("rank/") for k in out)  # the step's key
  np.testing.assert_allclose(out["intruders/fc/maxsim"][:r],
                             out["intruders/dn/maxsim"][:r], atol=1e-4)
  assert np.isnan(out["intruders/fc/maxsim"][r:]).all()
  X, Y = np.linalg.svd(Wref)[0][:, :10], np.linalg.svd(W)[0][:, :r]
  assert rel(out["subspace/fc/phi"], np.linalg.norm(X.T @ Y) ** 2 / r) < 1e-4


@pytest.mark.parametrize("limit", [512, 0])
def test_lora_equals_dense(limit):
  n, m, r = 40, 32, 4
  W0, _, _ = known(n, m, 3.0 * 0.8 ** np.arange(min(n, m)), 7)
  W0 = jnp.asarray(W0, jnp.float32)
  f = fz.lora.init(jax.random.PRNGKey(0), W0, r, alpha=8.0)
  f = fz.Lora(f.W0, f.A, 0.5 * jax.random.normal(jax.random.PRNGKey(1), (n, r)),
              f.scale)
  merged = fz.materialize(f)
  ref = {"fc": {"kernel": W0.T}, "dn": {"kernel": W0.T}}
  diag = Diagnostics(ref, dense_svd_limit=limit, heavy_tail=False)
  out = diag({"fc": {"kernel": f}, "dn": {"kernel": merged.T}})
  # spectral/* of an adapter describe the update scale * B A.
  s = np.linalg.svd(np.asarray(fz.lora.delta(f), np.float64), compute_uv=False)
  np.testing.assert_allclose(out["spectral/fc/sv"][:r], s[:r], rtol=1e-4)
  assert rel(out["spectral/fc/stable_rank"], (s[:r] ** 2).sum() / s[0] ** 2) < 1e-4
  assert rel(10 ** out["spectral/fc/kappa_log10"], s[0] / s[r - 1]) < 1e-4
  # intruders/* describe the merged W0 + update.
  np.testing.assert_allclose(out["intruders/fc/sv"], out["intruders/dn/sv"],
                             rtol=1e-4)
  np.testing.assert_allclose(out["intruders/fc/maxsim"],
                             out["intruders/dn/maxsim"], atol=1e-4)
  np.testing.assert_allclose(out["subspace/fc/cos_angles"],
                             out["subspace/dn/cos_angles"], atol=1e-4)
  assert rel(out["subspace/fc/phi"], out["subspace/dn/phi"]) < 1e-4


@pytest.mark.parametrize("limit", [512, 0])
def test_lowrank_adapter_equals_dense(limit):
  n, m, r = 36, 28, 3
  W0, _, _ = known(n, m, 2.0 * 0.75 ** np.arange(min(n, m)), 8)
  W0 = jnp.asarray(W0, jnp.float32)
  # A GeoLoRA-style adapter: frozen base W0 plus a trained U S V^T update.
  upd = fz.lowrank.init(jax.random.PRNGKey(3), n, m, r, capacity=6, scale=1.5)
  f = fz.LowRank(upd.U, upd.S, upd.V, upd.rank, W0)
  merged = fz.materialize(f)
  ref = {"fc": {"kernel": W0.T}, "dn": {"kernel": W0.T}}
  out = Diagnostics(ref, dense_svd_limit=limit, heavy_tail=False)(
      {"fc": {"kernel": f}, "dn": {"kernel": merged.T}})
  s = np.linalg.svd(np.asarray(merged - W0, np.float64), compute_uv=False)
  np.testing.assert_allclose(out["spectral/fc/sv"][:r], s[:r], rtol=1e-4)
  np.testing.assert_allclose(out["intruders/fc/maxsim"],
                             out["intruders/dn/maxsim"], atol=1e-4)
  np.testing.assert_allclose(out["intruders/fc/sv"], out["intruders/dn/sv"],
                             rtol=1e-4)


def test_tucker_equals_dense_unfoldings():
  f = fz.tucker.init(jax.random.PRNGKey(4), 12, 6, 3, 3, (5, 4, 3, 2),
                     capacities=(8, 6, 3, 3))
  # Non-orthonormal factors: the QR of each factor keeps the spectra exact.
  U2 = f.U2 + 0.2 * jax.random.normal(jax.random.PRNGKey(5), f.U2.shape) \
      * fz.lowrank.column_mask(f.ranks[1], 6)
  f = fz.Tucker(f.core, f.U1, U2, f.U3, f.U4, f.ranks)
  kernel = fz.tucker.to_flax_kernel(f)
  ref = {"c": {"kernel": kernel * 0 + jax.random.normal(jax.random.PRNGKey(6),
                                                          kernel.shape)}}
  ref["d"] = ref["c"]
  out = Diagnostics(ref)({"c": {"kernel": f}, "d": {"kernel": kernel}})
  _compare_spectral(out, out, "c", "d", kappa=False)
  full = np.asarray(fz.tucker.materialize(f), np.float64)
  for i in range(4):
    unf = np.moveaxis(full, i, 0).reshape(full.shape[i], -1)
    s = np.linalg.svd(unf, compute_uv=False)
    got = out[f"tucker/c/mode{i + 1}_sv"]
    np.testing.assert_allclose(got[:len(s)], s[:len(got)], rtol=1e-4, atol=1e-5)
  # rank/<layer> has one producer, the step's aux (base.rank_aux): for a
  # Tucker layer the (4,) mode ranks; diagnostics write no rank key.
  assert not any(k.startswith("rank/") or k.endswith("/ranks") for k in out)
  from lrtrain.integrators import base as ibase  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(ibase.rank_aux({"c": {"kernel": f}})["rank/c"],
                                [5, 4, 3, 2])
  np.testing.assert_allclose(out["intruders/c/maxsim"][:5],
                             out["intruders/d/maxsim"][:5], atol=1e-4)


# --- intruder dimensions ------------------------------------------------------


def _spectrum(p):
  return 10.0 * 0.8 ** np.arange(p)


def test_rank_one_spike_is_exactly_one_intruder():
  n, m, k = 64, 48, 10
  W0, U0, V0 = known(n, m, _spectrum(min(n, m)), 11)
  rng = np.random.default_rng(0)
  # A unit vector spread over the tail of W0's left basis: orthogonal to the
  # top-k subspace and with max |cos| <= ~1/sqrt(38) against every x_i.
  c = rng.choice([-1.0, 1.0], size=min(n, m) - k)
  u = U0[:, k:] @ c / np.linalg.norm(c)
  v = V0[:, k:] @ c / np.linalg.norm(c)
  Wt = W0 + 50.0 * np.outer(u, v)
  diag = Diagnostics(dense_params(W0), top_k=k, eps=0.5)
  out = diag(dense_params(Wt))
  assert out["intruders/fc1/count"] == 1 == out["intruders/total"]
  ms = out["intruders/fc1/maxsim"]
  assert ms[0] < 0.5 and (ms[1:] > 0.99).all()
  # sigma_1 = 50 + u^T W0 v, slightly above the spike's 50.
  assert 50.0 < out["intruders/fc1/sv"][0] < 51.0


def test_small_perturbation_has_no_intruders():
  W0, _, _ = known(64, 48, _spectrum(48), 12)
  noise = 1e-3 * np.random.default_rng(1).standard_normal(W0.shape)
  out = Diagnostics(dense_params(W0))(dense_params(W0 + noise))
  assert out["intruders/fc1/count"] == 0
  assert (out["intruders/fc1/maxsim"] > 0.99).all()
  assert out["subspace/fc1/phi"] > 0.99


def test_permuted_and_sign_flipped_vectors_have_no_intruders():
  n, m = 40, 40
  s = _spectrum(40)
  W0, U0, V0 = known(n, m, s, 13)
  rng = np.random.default_rng(2)
  perm = rng.permutation(40)
  signs = rng.choice([-1.0, 1.0], size=40)
  Wt = (U0 * signs)[:, perm] @ np.diag(s) @ V0[:, perm].T
  out = Diagnostics(dense_params(W0))(dense_params(Wt))
  assert out["intruders/fc1/count"] == 0
  np.testing.assert_allclose(out["intruders/fc1/maxsim"], 1.0, atol=1e-4)


def test_count_from_maxsim_matches_device_count():
  W0, _, _ = known(32, 32, _spectrum(32), 14)
  Wt = W0 + 0.8 * np.random.default_rng(3).standard_normal(W0.shape)
  for eps in (0.3, 0.5, 0.9):
    out = Diagnostics(dense_params(W0), eps=eps)(dense_params(Wt))
    assert count_from_maxsim([out["intruders/fc1/maxsim"]], eps) == \
        out["intruders/fc1/count"]
  got = count_from_maxsim([[0.1, 0.6, np.nan], [0.2]], np.array([0.15, 0.5, 1.0]))
  np.testing.assert_array_equal(got, [1, 2, 3])


# --- subspace similarity ------------------------------------------------------


def test_principal_angles_match_scipy():
  n, k = 50, 6
  W0, _, _ = known(n, n, _spectrum(n), 15)
  Wt = W0 + 2.0 * np.random.default_rng(4).standard_normal(W0.shape)
  out = Diagnostics(dense_params(W0), top_k=k)(dense_params(Wt))
  X = np.linalg.svd(W0)[0][:, :k]
  Y = np.linalg.svd(np.asarray(Wt, np.float32).astype(np.float64))[0][:, :k]
  cos = np.sort(np.cos(scipy.linalg.subspace_angles(X, Y)))[::-1]
  np.testing.assert_allclose(out["subspace/fc1/cos_angles"], cos, atol=1e-4)
  assert rel(out["subspace/fc1/phi"], np.linalg.norm(X.T @ Y) ** 2 / k) < 1e-4


def test_phi_of_unrelated_subspaces_is_near_random_baseline():
  n, k = 200, 10
  W0, _, _ = known(n, n, _spectrum(n), 16)
  W1, _, _ = known(n, n, _spectrum(n), 17)
  out = Diagnostics(dense_params(W0), top_k=k)(dense_params(W1))
  assert out["subspace/fc1/phi"] < 4 * k / n


# --- heavy tails --------------------------------------------------------------


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_powerlaw_alpha_recovers_pareto_exponent(alpha):
  rng = np.random.default_rng(int(alpha * 10))
  lam = (1.0 - rng.random(400)) ** (-1.0 / (alpha - 1.0))
  fit = powerlaw_alpha(jnp.asarray(lam))
  assert rel(fit["alpha"], alpha) < 0.1
  # Through the full pipeline: a matrix whose squared singular values are lam.
  n = m = 400
  lam_sorted = np.sort(lam)[::-1]
  W, _, _ = known(n, m, np.sqrt(lam_sorted), 18)
  out = Diagnostics(None)(dense_params(W))
  assert rel(out["heavytail/fc1/alpha"], alpha) < 0.1
  assert rel(out["heavytail/fc1/alpha_weighted"],
             out["heavytail/fc1/alpha"] * np.log10(lam_sorted[0])) < 1e-4


def test_heavy_tail_needs_fifty_eigenvalues():
  W, _, _ = known(60, 40, np.linspace(2, 1, 40))
  out = Diagnostics(None)(dense_params(W))
  assert not any(k.startswith("heavytail/") for k in out)
  lam = jnp.r_[jnp.linspace(1.0, 5.0, 45), jnp.zeros(20)]
  assert np.isnan(float(powerlaw_alpha(lam)["alpha"]))


# --- structure: keys, shapes, jit, parameter counts ---------------------------


def _model(key, rank):
  k = jax.random.split(key, 5)
  W0 = jax.random.normal(k[0], (32, 24))
  lr = fz.lowrank.init(k[1], 32, 24, 4, capacity=8)
  lr = fz.LowRank(lr.U, lr.S, lr.V, jnp.asarray(rank, jnp.int32))
  return {
      "conv1": {"kernel": jax.random.normal(k[2], (3, 3, 2, 6)),
                "bias": jnp.zeros(6)},
      "fc1": {"kernel": lr, "bias": jnp.zeros(32)},
      "fc2": {"kernel": fz.lora.init(k[3], W0, 2)},
      "head": {"kernel": jax.random.normal(k[4], (24, 10)), "bias": jnp.zeros(10)},
  }


def test_keys_shapes_stable_and_compiled_once():
  p0 = _model(jax.random.PRNGKey(0), 4)
  diag = Diagnostics(p0, top_k=5)
  a = diag(p0)
  # New values and a different active rank inside the same capacity.
  b = diag(jax.tree.map(lambda x: x * 1.1 if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, _model(jax.random.PRNGKey(1), 3)))
  assert diag.num_traces == 1
  assert list(a) == list(b)
  for key in a:
    assert np.shape(a[key]) == np.shape(b[key]), key
    assert isinstance(a[key], (float, int, np.ndarray)), key
  assert np.isnan(b["intruders/fc1/maxsim"][3:]).all()
  for name in ("conv1", "fc1", "fc2", "head"):
    assert a[f"spectral/{name}/sv"].shape == (5,)
    assert a[f"intruders/{name}/maxsim"].shape == (5,)
  assert a["intruders/total"] == sum(a[f"intruders/{n}/count"]
                                     for n in ("conv1", "fc1", "fc2", "head"))
  json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v)
              for k, v in a.items()})


def test_parameter_counts():
  p = _model(jax.random.PRNGKey(0), 3)
  out = Diagnostics(None)(p)
  assert out["params/fc1/train"] == 3 * (32 + 24) + 9
  assert out["params/fc2/train"] == 2 * (32 + 24)
  assert out["params/fc2/eval"] == out["params/fc2/dense"] == 32 * 24
  assert out["params/conv1/train"] == 3 * 3 * 2 * 6
  biases = 6 + 32 + 10
  conv = 3 * 3 * 2 * 6
  dense = conv + 32 * 24 * 2 + 240 + biases
  train = conv + (3 * 56 + 9) + 2 * 56 + 240 + biases
  evals = conv + (3 * 56 + 9) + 32 * 24 + 240 + biases
  assert (out["params/dense"], out["params/train"], out["params/eval"]) == \
      (dense, train, evals)
  assert rel(out["params/compression"], 1 - evals / dense) < 1e-6
  assert rel(out["params/train_compression"], 1 - train / dense) < 1e-6


def test_layer_selection_and_full_spectrum():
  p = _model(jax.random.PRNGKey(0), 4)
  out = Diagnostics(p, layers=["fc*"], full_spectrum=True)(p)
  assert "intruders/fc1/count" in out and "intruders/head/count" not in out
  assert out["spectral/head/sv_full"].shape == (10,)
  assert out["spectral/fc1/sv_full"].shape == (24,)
  assert (out["spectral/fc1/sv_full"][4:] == 0).all()


def test_reference_shape_mismatch_names_the_layer():
  diag = Diagnostics({"fc": {"kernel": jnp.ones((8, 4))}})
  with pytest.raises(ValueError, match="'fc'"):
    diag({"fc": {"kernel": jnp.ones((6, 4))}})


def test_on_a_built_model():
  from lrtrain import models
  cfg = models.default_model_config()
  cfg.name, cfg.widths, cfg.factor.kind, cfg.factor.rank = "mlp", (24, 16), "lowrank", 4
  module = models.build(cfg, num_classes=10, input_shape=(8, 8, 1))
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)),
                       train=False)["params"]
  out = Diagnostics(params, heavy_tail=False)(params)
  layers = [k[len("intruders/"):-len("/count")] for k in out
            if k.startswith("intruders/") and k.endswith("/count")]
  assert len(layers) == 3 and "head" in layers
  assert all(out[f"intruders/{l}/count"] == 0 for l in layers)
  assert not any(k.startswith("rank/") for k in out)
  assert 0 < out["params/compression"] < 1
