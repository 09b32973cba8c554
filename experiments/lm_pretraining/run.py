"""Run the LM pretraining comparison and write its results.

  python -m experiments.lm_pretraining.run [--runlocal]

Training: the sweep of config.py (every method x 3 seeds); finished runs
are skipped, interrupted ones resume.

Outputs (results/): runs.csv (one row per method and seed), comparison.csv
(per method, mean and std over seeds: validation and test perplexity,
trainable parameters, bytes of parameters + optimizer state, steady steps
per second, final stable rank per projection type), perplexity_memory.png
(validation perplexity against parameter + optimizer-state memory, every
seed and the mean) and published.csv (GaLore's 60M / 130M C4 rows beside
ours, scale stated).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from experiments import common as gc
from experiments.lm_pretraining import config as study_config
from lrtrain import train as train_lib
from lrtrain.integrators import base as ibase

STUDY = "lm_pretraining"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def memory_bytes(cfg) -> dict[str, int]:
  """Bytes of the parameters (frozen ones included) and of the optimizer
  state of `cfg`'s run at its initial ranks, from shapes alone."""
  run = train_lib.build_run(cfg)
  params, _, _ = run.integrator.resize(run.init_params, None)
  state = jax.eval_shape(run.integrator.init, params)
  size = lambda t: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(t))
  return {"param_bytes": size(params), "state_bytes": size(state),
          "trainable_bytes": size(ibase.trainable(params))}


def _last(rows, key):
  vals = [r[key] for r in rows if key in r]
  return vals[-1] if vals else None


def stable_ranks(rows) -> dict[str, float]:
  """Mean over blocks of each projection's stable rank at the last
  diagnostics step."""
  last = max((r["step"] for r in rows if any(k.endswith("/stable_rank") for k in r)),
             default=None)
  if last is None:
    return {}
  row = {}
  for r in rows:
    if r["step"] == last:
      row.update(r)
  out = {}
  for p in PROJECTIONS:
    vals = [v for k, v in row.items() if k.startswith("spectral/")
            and k.endswith(f"/{p}/stable_rank")]
    if vals:
      out[p] = float(np.mean(vals))
  return out


def report(workdir: str, results: str) -> list[dict]:
  rows = []
  mem_cache: dict[str, dict] = {}
  for d in gc.finished_runs(workdir):
    cfg, s, m = (gc.load_config(d), gc.read_json(os.path.join(d, "summary.json")),
                 gc.metrics(d))
    method = cfg.integrator.name       # one integrator per method here
    if method not in mem_cache:
      mem_cache[method] = memory_bytes(cfg)
    mem = mem_cache[method]
    sr = stable_ranks(m)
    rows.append({
        "method": method, "seed": int(cfg.seed), "steps": s["steps"],
        "tokens": s["steps"] * cfg.train.batch_size * cfg.model.max_len,
        "val_perplexity": _last(m, "eval/perplexity"),
        "val_bits_per_byte": _last(m, "eval/bits_per_byte"),
        "test_perplexity": s.get("test/perplexity"),
        "trainable_params": s["params/train"],
        "param_state_mib": (mem["param_bytes"] + mem["state_bytes"]) / 2 ** 20,
        "steady_steps_per_sec": s.get("time/steady_steps_per_sec"),
        **{f"stable_rank_{p}": sr.get(p) for p in PROJECTIONS}})
  order = list(study_config.METHODS)
  rows.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order
                           else len(order), r["seed"]))
  out = {"runs": gc.write_csv(os.path.join(results, "runs.csv"), rows)}

  comp = []
  for meth in [x for x in order if any(r["method"] == x for r in rows)]:
    sel = [r for r in rows if r["method"] == meth]
    row = {"method": meth, "seeds": len(sel)}
    for key in ("val_perplexity", "test_perplexity", "steady_steps_per_sec",
                *[f"stable_rank_{p}" for p in PROJECTIONS]):
      v = np.array([r[key] for r in sel if r[key] is not None], float)
      row[f"{key}_mean"] = float(v.mean()) if len(v) else None
      row[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    row["trainable_params"] = sel[0]["trainable_params"]
    row["param_state_mib"] = sel[0]["param_state_mib"]
    row["tokens"] = sel[0]["tokens"]
    comp.append(row)
  out["comparison"] = gc.write_csv(os.path.join(results, "comparison.csv"), comp)

  pub = gc.published("galore_llama_c4.csv")
  out["published"] = gc.write_csv(os.path.join(results, "published.csv"), [
      {**p, "scale_vs_ours": "C4, 32000-token vocabulary, 60M-130M parameters, "
       "1.1B-2.2B tokens; ours: bytes of one book, 0.86M parameters, 1.2M tokens"}
      for p in pub])

  fig, ax = gc.figure(1, 1, (6.5, 4.5))
  a = ax[0, 0]
  for i, c in enumerate(comp):
    sel = [r for r in rows if r["method"] == c["method"]]
    a.plot([r["param_state_mib"] for r in sel], [r["val_perplexity"] for r in sel],
           "o", color=f"C{i}", alpha=0.4, ms=4)
    a.errorbar([c["param_state_mib"]], [c["val_perplexity_mean"]],
               yerr=[c["val_perplexity_std"]], fmt="s", color=f"C{i}",
               label=c["method"], capsize=3)
  a.set_xlabel("parameters + optimizer state (MiB, float32)")
  a.set_ylabel("validation perplexity (bytes)")
  a.set_title(f"tiny LLaMA, {comp[0]['tokens'] / 1e6:.2f}M tokens "
              "(dots: seeds, squares: mean +- std)" if comp else "", fontsize=9)
  a.grid(alpha=.3)
  a.legend(fontsize=8)
  out["perplexity_memory_png"] = gc.save(fig, os.path.join(results, "perplexity_memory.png"))
  return comp


main = gc.cli(STUDY, report, doc=__doc__)


if __name__ == "__main__":
  main()
