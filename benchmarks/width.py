"""Step time vs width and rank (the DLRT paper's timing figure), memory, FLOPs.

MLP with three hidden n x n layers (input dimension n, 10 outputs), batch
256. The hidden layers are dense, LowRank (KLS fixed / KLS adaptive settled /
GeoLoRA / CondLR), Lora adapters on a dense base (plain optax on A, B), or
dense with GaLore's projected optimizer; the output layer is always dense.
The model is written directly on the factorization API (the Flax Dense layer
issues the same operations) so the benchmark isolates integrator cost.

"KLS adaptive (settled)" is the rank-adaptive step at active rank r with
r_min = r_max = r: the whole augment / QR / SVD / truncate path runs, the
rank stays put, which is the regime of a run whose ranks have settled.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from lrtrain import factorizations as fz
from lrtrain import integrators

METHODS = ("dense", "kls", "kls_adaptive", "geolora", "condlr", "lora", "galore")
BATCH = 256
CLASSES = 10


def make_params(method: str, n: int, r: int, key, d_in: int | None = None,
                capacity: int | None = None, init: str = "svd") -> dict:
  """Three hidden n-wide layers of the method's kind and a dense output.

  The first layer maps d_in (default n) to n; capacity overrides the
  LowRank buffer size (default: r, or the power-of-two bucket for adaptive).
  init: "svd" truncates the dense draw (training runs); "random" draws
  orthonormal factors directly (timing: an n x n SVD per layer costs about
  a minute at n = 4096 on this CPU and does not change the step time).
  """
  keys = jax.random.split(key, 8)
  params = {}
  for i in range(3):
    m = n if (i or d_in is None) else d_in
    W = jax.random.normal(keys[i], (n, m)) / np.sqrt(m)
    if method in ("dense", "galore"):
      kernel = W.T
    elif method == "lora":
      kernel = fz.lora.init(keys[4 + i], W, r)
    else:
      adaptive = method in ("kls_adaptive", "geolora")
      cap = capacity or (fz.lowrank.bucket_capacity(r, min(n, m)) if adaptive
                         else r)
      kernel = (fz.lowrank.from_dense(W, r, capacity=cap) if init == "svd" else
                fz.lowrank.init(keys[4 + i], n, m, r, capacity=cap))
    params[f"fc{i}"] = {"kernel": kernel, "bias": jnp.zeros((n,))}
  params["out"] = {"kernel": jax.random.normal(keys[3], (n, CLASSES)) / np.sqrt(n),
                   "bias": jnp.zeros((CLASSES,))}
  return params


def forward(params, x):
  for i in range(3):
    k = params[f"fc{i}"]["kernel"]
    x = (fz.apply(k, x) if fz.is_factor(k) else x @ k) + params[f"fc{i}"]["bias"]
    x = jax.nn.relu(x)
  return x @ params["out"]["kernel"] + params["out"]["bias"]


def loss_fn(params, batch):
  logits = forward(params, batch["x"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
  return loss, {}


def make_integrator(method: str, r: int, lr: float = 0.01):
  tx = optax.sgd(lr, momentum=0.9)
  if method == "dense":
    return integrators.build("dense", tx)
  if method == "kls":
    return integrators.build("kls", tx, adaptive=False)
  if method == "kls_adaptive":
    return integrators.build("kls", tx, adaptive=True, tau=0.1, r_min=r, r_max=r)
  if method == "geolora":
    return integrators.build("geolora", tx, tau=0.1, r_min=r, r_max=r)
  if method == "condlr":
    return integrators.build("condlr", tx, variant="approx_orth", kappa_tau=0.1)
  if method == "lora":
    return integrators.build("lora", tx)
  if method == "galore":
    return integrators.build("galore", tx, galore_rank=r)
  raise ValueError(method)


def step_flops_by_shape(method: str, n: int, r: int, b: int = BATCH
                        ) -> dict[int, float]:
  """Analytic matmul FLOPs of one training step (2 per multiply-add), by
  the inner width k of the (b, n) x (n, k) product shape whose rate prices
  them in the floor at the step's own shapes (`floor_shapes_ms`).

  Forward + backward of a linear map costs 3x its forward (2 b m n each).
  Factored forward: x V (b n r), S^T (b r r), U^T (b r n). Integrator extras:
  QR of n x k ~ 4 n k^2, SVD of k x k ~ 22 k^3 (k = augmented width).
  The pass of a factored layer (and the output layer beside it) is priced
  at width r; the rank-adaptive methods' QR, SVD and core gradient at the
  augmented width 2r.
  """
  dense_layer = 2 * b * n * n
  out = 3 * 2 * b * n * CLASSES
  lr_layer = 2 * b * (2 * n * r + r * r)
  if method in ("dense", "galore"):
    f = 3 * (3 * dense_layer)
    if method == "galore":  # projection in and out of the rank-r subspace
      f += 3 * (2 * 2 * n * n * r)
    return {n: f + out}
  if method == "lora":
    return {n: 3 * (3 * dense_layer - 2 * b * n * n + 3 * lr_layer) + out}
  if method == "kls":  # K/L pass + S pass (two forward+backward), QR n x r x2
    return {r: 3 * (2 * 3 * lr_layer + 2 * 4 * n * r * r) + 2 * out}
  if method == "condlr":  # one backward, QR retractions n x r, SVD r x r
    return {r: 3 * (3 * lr_layer + 2 * 4 * n * r * r + 22 * r ** 3) + out}
  k = 2 * r
  extra = 3 * (2 * 4 * n * k * k + 22 * k ** 3)
  if method == "kls_adaptive":
    # One forward + backward (the K/L pass); the S sub-step's gradient
    # (dY U^)^T (x V^) from that pass's layer inputs and output cotangents:
    # a factored layer's forward at width k.
    extra += 3 * 2 * b * (2 * n * k + k * k)
  elif method != "geolora":
    raise ValueError(method)
  parts = {r: 3 * 3 * lr_layer + out}
  w = min(k, n)             # the rate's shape (`floor_width`)
  parts[w] = parts.get(w, 0) + extra
  return parts


def step_flops(method: str, n: int, r: int, b: int = BATCH) -> float:
  """Analytic matmul FLOPs of one training step (`step_flops_by_shape`)."""
  return sum(step_flops_by_shape(method, n, r, b).values())


def floor_width(method: str, n: int, r: int) -> int:
  """Inner dimension of the product that dominates the method's step: the
  floor's matmul rate is measured at (BATCH, n) x (n, k) with this k."""
  if method in ("dense", "galore", "lora"):
    return n
  if method in ("kls_adaptive", "geolora"):
    return min(2 * r, n)
  return r


def _rate_operands(n: int, k: int):
  key = jax.random.PRNGKey(0)
  return (jax.random.normal(key, (BATCH, n)), jax.random.normal(key, (n, k)),
          jax.random.normal(key, (BATCH, k)))


def _three_products(x, w, g):
  return x @ w, g @ w.T, x.T @ g


def rate_flops(n: int, k: int) -> float:
  """FLOPs of `matmul_rate`'s three products at (BATCH, n) x (n, k)."""
  return 3 * 2 * BATCH * n * k


def matmul_rate(n: int, k: int) -> float:
  """Jitted float32 rate in FLOP/s of a linear layer's three products at
  (BATCH, n) x (n, k): forward x W, backward g W^T and x^T g, measured now
  (`bench_point` times them between blocks of the point's steps, so the
  floor and the step see the host at the same speed)."""
  ms = common.time_call(_three_products, *_rate_operands(n, k), steps=30,
                        repeats=1)
  return rate_flops(n, k) / (ms * 1e-3)


def floor_ms(method: str, n: int, r: int, rate: float | None = None) -> float:
  """The analytic floor: `step_flops` at the rate (FLOP/s) of the step's
  dominant product shape (`floor_width`; measured now unless given)."""
  if rate is None:
    rate = matmul_rate(n, floor_width(method, n, r))
  return step_flops(method, n, r) / rate * 1e3


def floor_shapes_ms(method: str, n: int, r: int,
                    rates: dict[int, float]) -> float:
  """The floor at the step's own shapes: each part of `step_flops_by_shape`
  at the rate (FLOP/s, `matmul_rate`) of its own width. It differs from
  `floor_ms` for the rank-adaptive methods only, whose pass runs at width r
  while `floor_ms` prices the whole step at the augmented width's rate."""
  return sum(f / rates[k] for k, f in step_flops_by_shape(method, n, r).items()
             ) * 1e3


def trainable_bytes(params, state) -> int:
  """Bytes of trainable params + optimizer state (frozen leaves excluded)."""
  from lrtrain.integrators import base
  frozen = base.frozen_mask(params)
  p = jax.tree.map(lambda x, f: None if f else x, params, frozen)
  return common.nbytes(p) + common.nbytes(state)


def analytic_bytes(method: str, n: int, r: int, moments: int = 1) -> int:
  """float32 bytes of r(n + m) + r^2 per layer (dense: n m) times (1 + moments),
  plus the dense output layer and biases."""
  per = n * n if method in ("dense", "galore") else (
      2 * n * r if method == "lora" else r * (2 * n) + r * r)
  total = 3 * (per + n) + n * CLASSES + CLASSES
  return 4 * total * (1 + moments)


def bench_point(method: str, n: int, r: int, *, steps: int, repeats: int,
                budget_s: float | None = None, key=jax.random.PRNGKey(0)) -> dict:
  params = make_params(method, n, r, key, init="random")
  integ = make_integrator(method, r)
  state = integ.init(params)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (BATCH, n)),
           "y": jax.random.randint(ky, (BATCH,), 0, CLASSES)}
  step = jax.jit(lambda p, s, b: integ.step(loss_fn, p, s, b)[:2],
                 donate_argnums=(0, 1))

  def run(carry):
    p, s = carry
    return step(p, s, batch)

  k = floor_width(method, n, r)
  widths = sorted(set(step_flops_by_shape(method, n, r)) | {k})
  rate_fn = jax.jit(_three_products)
  probes = {w: (lambda ops=_rate_operands(n, w): rate_fn(*ops)) for w in widths}
  res = common.time_steps(run, (params, state), steps=steps, repeats=repeats,
                          budget_s=budget_s, beside=probes)
  p, s = res.pop("carry")
  flops = step_flops(method, n, r)
  # Per block of steps: the rates measured right after it, both floors at
  # those rates, and the step's ratio to each; medians over the blocks.
  rates, single, own, by_width = [], [], [], {w: [] for w in widths}
  for step_ms, probe_ms in res.pop("blocks"):
    rate = {w: rate_flops(n, w) / (probe_ms[w] * 1e-3) for w in widths}
    rates.append(rate[k])
    for w in widths:
      by_width[w].append(rate[w] / 1e9)
    single.append((step_ms, floor_ms(method, n, r, rate=rate[k])))
    own.append((step_ms, floor_shapes_ms(method, n, r, rate)))
  med = lambda xs: float(np.median(xs))
  out = dict(method=method, n=n, r=r, **res, flops=flops,
             floor_ms=med([f for _, f in single]),
             floor_gflops=[min(rates) / 1e9, med(rates) / 1e9, max(rates) / 1e9],
             step_over_floor=med([t / f for t, f in single]),
             floor_shapes_ms=med([f for _, f in own]),
             step_over_floor_shapes=med([t / f for t, f in own]),
             floor_shapes_gflops={str(w): med(v) for w, v in by_width.items()},
             gflops=flops / (res["ms"] * 1e-3) / 1e9,
             bytes=trainable_bytes(p, s),
             analytic_bytes=analytic_bytes(method, n, r))
  return out


def ranks_for(n: int, ranks=(8, 32, 64, 128)) -> list[int]:
  """The given ranks and n/4 (only the given ones if n/4 is not among the
  defaults' companions, i.e. when a custom rank list is passed)."""
  extra = (n // 4,) if tuple(ranks) == (8, 32, 64, 128) else ()
  return sorted({r for r in (*ranks, *extra) if 2 * r <= n})


# Augmented methods at r = n/4 work on n x n/2 bases (QR of 4096 x 2048 and
# an SVD of 2048 x 2048 per layer and step): tens of seconds per step on 2
# CPU cores, so these points are listed as skipped on a CPU, timed on a GPU.
HEAVY_N = 4096


def skipped(method: str, n: int, r: int) -> bool:
  """Points left out on a CPU: augmented methods at r = n/4 for n >= 4096,
  and GaLore at n >= 4096 but for one rank (its first step computes the
  projector, an SVD of each n x n gradient: ~75 s per 4096 x 4096 layer
  here, whatever r is, so one rank shows the steady step)."""
  if jax.default_backend() != "cpu":
    return False
  if method in ("kls_adaptive", "geolora"):
    return n >= HEAVY_N and 4 * r >= n
  if method == "galore":
    return n >= HEAVY_N and (n > HEAVY_N or r != 128)
  return False


def run(widths, *, steps: int, repeats: int, methods=METHODS, log=print,
        ranks=(8, 32, 64, 128), budget_s: float | None = None,
        on_row=None) -> list[dict]:
  """All (width, rank, method) points; dense once per width.

  budget_s caps the timed seconds per repeat of a slow point (see
  common.time_steps); the steps used are recorded per row.
  """
  kw = dict(steps=steps, repeats=repeats, budget_s=budget_s)
  rows = []
  for n in widths:
    dense = bench_point("dense", n, 0, **kw)
    rows.append(dict(dense, ratio=1.0))
    if on_row:
      on_row(rows)
    log(f"n={n:5d} dense          {dense['ms']:9.2f} ms  ({dense['steps']} steps)")
    for r in ranks_for(n, ranks):
      for m in methods:
        if m == "dense":
          continue
        if skipped(m, n, r):
          log(f"n={n:5d} r={r:4d} {m:13s} skipped (see HEAVY_N)")
          continue
        pt = bench_point(m, n, r, **kw)
        pt["ratio"] = pt["ms"] / dense["ms"]
        rows.append(pt)
        if on_row:
          on_row(rows)
        log(f"n={n:5d} r={r:4d} {m:13s} {pt['ms']:9.2f} ms  x{pt['ratio']:.2f} dense"
            f"  ({pt['steps']} steps)")
  return rows


def rows_from_log(path: str, widths) -> list[dict]:
  """Rows of an earlier run's printed log (ms, ratio, steps) for `widths`;
  flops and bytes are recomputed (they do not depend on timing), the
  spread is unknown (None)."""
  import re
  pat = re.compile(r"^n=\s*(\d+)(?: r=\s*(\d+))? (\w+)\s+([\d.]+) ms"
                   r"(?:\s+x([\d.]+) dense)?\s+\((\d+) steps\)")
  rows = []
  with open(path) as f:
    for line in f:
      m = pat.match(line)
      if not m or int(m.group(1)) not in widths:
        continue
      n, r = int(m.group(1)), int(m.group(2) or 0)
      method, ms = m.group(3), float(m.group(4))
      integ = make_integrator(method, r)
      # Shapes only (no SVDs): bytes do not depend on the values.
      p_s, s_s = jax.eval_shape(
          lambda k: (lambda p: (p, integ.init(p)))(make_params(method, n, r, k)),
          jax.random.PRNGKey(0))
      zeros = lambda t: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), t)
      params, state = zeros(p_s), zeros(s_s)
      flops = step_flops(method, n, r)
      rows.append(dict(method=method, n=n, r=r, ms=ms, ms_min=None, ms_max=None,
                       steps=int(m.group(6)),
                       ratio=float(m.group(5)) if m.group(5) else 1.0,
                       flops=flops, gflops=flops / (ms * 1e-3) / 1e9,
                       bytes=trainable_bytes(params, state),
                       analytic_bytes=analytic_bytes(method, n, r),
                       source=os.path.basename(path)))
  return rows
