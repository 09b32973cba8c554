"""Rank-adaptive runs: compilations, bucket changes, step time vs active rank;
and seeds vmapped in one program vs sequential runs.

Task: the scikit-learn digits (8x8) with an MLP of three LowRank hidden
layers (width 256) and a dense output, trained with rank-adaptive KLS from
rank 64 at tau 0.3, so the ranks fall, cross capacity buckets and settle
(from rank 2 at tau 0.05 they never leave 2 on this task: a single step's
update in the new directions stays below tau ||S||).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from benchmarks import common, width
from lrtrain import factorizations as fz
from lrtrain import integrators

WIDTH = 256


def digits_batches(batch: int, seed: int = 0):
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      j = idx[i:i + batch]
      yield {"x": jnp.asarray(x[j]), "y": jnp.asarray(y[j])}


def capacities(params) -> tuple[int, ...]:
  return tuple(f.capacity for _, f in fz.factor_paths(params))


def ranks(params) -> tuple[int, ...]:
  return tuple(int(f.rank) for _, f in fz.factor_paths(params))


def adaptive_run(steps: int = 2000, tau: float = 0.3, r0: int = 64,
                 r_max: int = 128, lr: float = 0.05, batch: int = 64,
                 rounds: int = 10, round_steps: int = 20) -> dict:
  """Compilations and bucket changes of a rank-adaptive KLS run; then its
  step beside fixed-rank KLS at the final ranks (`rounds` alternated
  blocks of `round_steps` steps each)."""
  params = width.make_params("kls_adaptive", WIDTH, r0, jax.random.PRNGKey(0),
                             d_in=64)
  integ = integrators.build("kls", optax.sgd(lr, momentum=0.9), adaptive=True,
                            tau=tau, r_min=2, r_max=r_max)
  state = integ.init(params)
  step = jax.jit(lambda p, s, b: integ.step(width.loss_fn, p, s, b),
                 donate_argnums=(0, 1))
  data = digits_batches(batch)
  counter = common.compile_counter()
  bucket_changes, trace = 0, []

  def one(params, state):
    """One step of the run and its resize: (params, state, ms, changed,
    loss)."""
    b = next(data)                   # outside the timing, as in _fixed_rank
    t0 = time.perf_counter()
    params, state, aux = step(params, state, b)
    jax.block_until_ready(aux["loss"])
    dt = time.perf_counter() - t0
    caps_before = capacities(params)
    params, state, changed = integ.resize(params, state)
    moved = changed and capacities(params) != caps_before
    return params, state, dt * 1e3, moved, float(aux["loss"])

  t_start = time.perf_counter()
  with counter.counting():
    params, state, _ = integ.resize(params, state)  # initial bucketing
    for t in range(steps):
      params, state, ms, moved, loss = one(params, state)
      bucket_changes += moved
      trace.append((t, ms, ranks(params), capacities(params), loss))
  wall = time.perf_counter() - t_start
  final_r = trace[-1][2]
  # Steady-state time: median of the last 200 steps (no compile inside).
  tail_ms = statistics.median(x[1] for x in trace[-200:])
  # The same step beside fixed-rank KLS at the final ranks, in alternated
  # blocks: steps of about a millisecond follow the host's speed, which
  # drifts between a run and a measurement made after it.
  fixed, carry = _fixed_rank(final_r, batch)
  ratios, mine, theirs = [], [], []
  for _ in range(rounds):
    a = []
    for _ in range(round_steps):
      params, state, ms, _, _ = one(params, state)
      a.append(ms)
    f = []
    for _ in range(round_steps):
      t0 = time.perf_counter()
      carry = common.block(fixed(carry))
      f.append((time.perf_counter() - t0) * 1e3)
    mine.append(statistics.median(a))
    theirs.append(statistics.median(f))
    ratios.append(mine[-1] / theirs[-1])
  return dict(steps=steps, tau=tau, r0=r0, compilations=step._cache_size(),
              backend_compilations=counter.count,
              compile_seconds=counter.seconds, bucket_changes=bucket_changes,
              bucket_limit=int(np.log2(r_max)) + 1, wall_seconds=wall,
              final_ranks=final_r, final_capacities=trace[-1][3],
              final_loss=trace[-1][4], tail_ms=tail_ms,
              alternated=dict(ratio=statistics.median(ratios),
                              adaptive_ms=statistics.median(mine),
                              fixed_rank_ms=statistics.median(theirs),
                              rounds=rounds, round_steps=round_steps),
              rank_trace=[(t, list(r), list(c)) for t, _, r, c, _ in trace[::50]])


def _fixed_rank(rank_list, batch: int):
  """(step, carry) of fixed-rank KLS (capacity = r) at the given per-layer
  ranks, carry = step(carry) on one digits batch, compiled and warm."""
  key = jax.random.PRNGKey(0)
  params = width.make_params("kls", WIDTH, 2, key, d_in=64)
  for i, r in enumerate(rank_list):
    n, m = params[f"fc{i}"]["kernel"].shape
    W = jax.random.normal(jax.random.fold_in(key, i), (n, m)) / np.sqrt(m)
    params[f"fc{i}"]["kernel"] = fz.lowrank.from_dense(W, r)
  integ = integrators.build("kls", optax.sgd(0.05, momentum=0.9), adaptive=False)
  state = integ.init(params)
  step = jax.jit(lambda p, s, b: integ.step(width.loss_fn, p, s, b)[:2],
                 donate_argnums=(0, 1))
  b = next(digits_batches(batch))
  run = lambda c: step(c[0], c[1], b)
  carry = (params, state)
  for _ in range(3):
    carry = common.block(run(carry))
  return run, carry


def seeds_vmapped(num_seeds: int = 8, steps: int = 200, rank: int = 32,
                  batch: int = 64, width_: int = 128,
                  methods=("kls_adaptive", "dense"), scaling=True) -> dict:
  """Throughput of num_seeds runs vmapped in one program vs one by one.

  Model: the digits demo's shapes (64 -> width_ hidden layers, 10 classes,
  batch 64). For each method, the step time of one seed and of 1, 2, 4 and
  num_seeds seeds vmapped (the scaling shows what the batch amortises);
  rank-adaptive KLS runs at a fixed capacity (no bucket change), so every
  seed has the same shapes.
  """
  tx = optax.sgd(0.05, momentum=0.9)
  data = digits_batches(batch)
  b = next(data)
  out = {}
  for method in methods:
    if method == "dense":
      integ = integrators.build("dense", tx)
      init = lambda k: width.make_params("dense", width_, rank, k, d_in=64)
    else:
      integ = integrators.build("kls", tx, adaptive=True, tau=0.05, r_min=2,
                                r_max=rank)
      cap = fz.lowrank.bucket_capacity(rank, 64)
      init = lambda k: width.make_params("kls_adaptive", width_, rank, k,
                                         d_in=64, capacity=cap)
    keys = jax.random.split(jax.random.PRNGKey(0), num_seeds)
    one = jax.jit(lambda p, s: integ.step(width.loss_fn, p, s, b)[:2])
    p1 = init(keys[0])
    seq = common.time_steps(lambda c: one(*c), (p1, integ.init(p1)),
                            steps=steps, repeats=3)
    many = jax.jit(jax.vmap(lambda p, s: integ.step(width.loss_fn, p, s, b)[:2]))
    by_k = {}
    for k in sorted({1, 2, 4, num_seeds}) if scaling else [num_seeds]:
      pv = jax.vmap(init)(keys[:k])
      vm = common.time_steps(lambda c: many(*c), (pv, jax.vmap(integ.init)(pv)),
                             steps=steps, repeats=3)
      by_k[k] = vm["ms"]
    out[method] = dict(sequential_ms_per_step=seq["ms"],
                       vmapped_ms_per_step=by_k[num_seeds],
                       vmapped_ms_by_seeds=by_k,
                       speedup=num_seeds * seq["ms"] / by_k[num_seeds])
  main = out[methods[0]]
  return dict(num_seeds=num_seeds, width=width_, rank=rank, batch=batch,
              method=methods[0], by_method=out, **main)
