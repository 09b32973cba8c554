"""Run the LM pretraining comparison and write its results.

  python -m experiments.lm_pretraining.run [--runlocal]

Training: the sweep of config.py (every method x 3 seeds); finished runs
are skipped, interrupted ones resume.

Outputs (results/): runs.csv (one row per method and seed), comparison.csv
(per method, mean and std over seeds: validation and test perplexity,
trainable parameters, bytes of parameters + optimizer state at the start
and at the end (rank-adaptive methods shrink their buffers with their
ranks), steady steps per second, stable rank of the final weight per projection type),
perplexity_memory.png
(validation perplexity against parameter + optimizer-state memory, every
seed and the mean) and published.csv (GaLore's 60M / 130M C4 rows beside
ours, scale stated).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from experiments import common as gc
from experiments.lm_pretraining import config as study_config
from lrtrain import config_utils as cu
from lrtrain import factorizations as fz
from lrtrain import pretrained
from lrtrain import train as train_lib
from lrtrain.diagnostics import core as diag_core

STUDY = "lm_pretraining"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def _with_defaults(saved) -> ml_collections.ConfigDict:
  """A run's saved config over today's defaults (fields added since the
  run was made take their default)."""
  c = cu.base_config()

  def merge(node, d):
    for k, v in d.items():
      if isinstance(v, dict) and isinstance(node.get(k), ml_collections.ConfigDict):
        merge(node[k], v)
      else:
        node[k] = tuple(v) if isinstance(v, list) else v
  merge(c, saved.to_dict())
  return c


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def memory_bytes(run, params) -> dict[str, int]:
  """Bytes of `params` (frozen ones included, in the capacity buckets the
  integrator keeps them in) and of the optimizer state it would hold for
  them, from shapes alone."""
  params, _, _ = run.integrator.resize(params, None)
  state = jax.eval_shape(run.integrator.init, params)
  return {"param_bytes": _bytes(params), "state_bytes": _bytes(state)}


def _last(rows, key):
  vals = [r[key] for r in rows if key in r]
  return vals[-1] if vals else None


def stable_ranks(params) -> dict[str, float]:
  """Mean over blocks of each projection's stable rank ||W||_F^2 / ||W||_2^2
  of a weight (W = W0 + s B A for LoRA and ReLoRA, B A + S for SLTrain,
  U S V^T for the factorized methods)."""
  by = {}
  for name, x in diag_core.find_layers(params):
    proj = name.rsplit("/", 1)[-1]
    if proj not in PROJECTIONS:
      continue
    W = fz.as_matrix(x) if fz.is_factor(x) else diag_core.layer_matrix(name, x)
    s = np.linalg.svd(np.asarray(W, np.float64), compute_uv=False)
    by.setdefault(proj, []).append(float(np.sum(s ** 2) / s[0] ** 2))
  return {p: float(np.mean(v)) for p, v in by.items()}


def report(workdir: str, results: str) -> dict[str, str]:
  rows = []
  runs: dict[str, train_lib.Run] = {}
  for d in gc.finished_runs(workdir):
    cfg, s, m = (gc.load_config(d), gc.read_json(os.path.join(d, "summary.json")),
                 gc.metrics(d))
    method = cfg.integrator.name       # one integrator per method here
    if method not in runs:
      runs[method] = train_lib.build_run(_with_defaults(cfg))
    run = runs[method]
    final = pretrained.restore_params(d, run.init_params)
    start, end = memory_bytes(run, run.init_params), memory_bytes(run, final)
    sr = stable_ranks(final)
    rows.append({
        "method": method, "seed": int(cfg.seed), "steps": s["steps"],
        "tokens": s["steps"] * cfg.train.batch_size * cfg.model.max_len,
        "val_perplexity": _last(m, "eval/perplexity"),
        "val_bits_per_byte": _last(m, "eval/bits_per_byte"),
        "test_perplexity": s.get("test/perplexity"),
        "trainable_params": s["params/train"],
        "param_state_mib": (end["param_bytes"] + end["state_bytes"]) / 2 ** 20,
        "param_state_mib_start": (start["param_bytes"] + start["state_bytes"]) / 2 ** 20,
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
    for key in ("trainable_params", "param_state_mib", "param_state_mib_start"):
      row[key] = float(np.mean([r[key] for r in sel]))
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
  a.set_xlabel("parameters + optimizer state at the end (MiB, float32)")
  a.set_ylabel("validation perplexity (bytes)")
  a.set_title(f"tiny LLaMA, {comp[0]['tokens'] / 1e6:.2f}M tokens "
              "(dots: seeds, squares: mean +- std)" if comp else "", fontsize=9)
  a.grid(alpha=.3)
  a.legend(fontsize=8)
  out["perplexity_memory_png"] = gc.save(fig, os.path.join(results, "perplexity_memory.png"))
  return out


main = gc.cli(STUDY, report, doc=__doc__)


if __name__ == "__main__":
  main()
