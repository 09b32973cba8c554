"""CondLR robustness: LeNet5 on Fashion-MNIST at 50% / 80% compression,
condition numbers of the cores during training and accuracy under FGSM.

  python -m experiments.condlr_robustness.run

(the wrapper expands this file's sweep and trains each point with the
per-layer ranks r = ceil((1 - cr) min(n, m)), which one model.factor.rank
cannot express, then attacks every final checkpoint). Methods: dense;
at each cr: fixed-rank KLS (DLRT), plain optax on U, S, V ('factors'),
CondLR 'mean' (kappa(S) = 1 exactly, so its tau is moot) and CondLR
'approx_orth' with tau in {0.1, 0.5}. Optimizer as in the paper's LeNet5
setting: SGD lr 0.1, momentum 0.3. Scale (2-core shared CPU): 10k
training examples, batch 128, 250 steps (~3 epochs). `dataset=mnist`
selects the paper's dataset on a connected machine.

References:
  Savostianova, Zangrando, Ceruti, Tudisco, "Robust low-rank training via
  approximate orthonormal constraints", NeurIPS 2023.
"""

import ml_collections

from lrtrain import config_utils as cu

COMPRESSIONS = (0.5, 0.8)
EPS = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06)   # FGSM budgets, [0, 1] pixels


def get_config(arg=None):
  """arg: runlocal, dataset, cr, method, variant, tau, seed, steps."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist", cr=0.5,
                   method="condlr", variant="mean", tau=0.1, seed=0, steps=250)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = a.dataset
  c.data.max_train = 10000          # examples (subset for the CPU budget)
  c.data.validation_size = 1000     # examples

  c.study = ml_collections.ConfigDict()
  c.study.cr = a.cr                 # compression ratio of every factorized layer
  c.study.attack_examples = 2000    # test examples attacked per run
  c.study.eps = EPS                 # FGSM budgets in [0, 1] pixel units

  c.model.name = "lenet5"
  c.model.factor.kind = "lowrank"
  c.model.factor.conv_kind = "lowrank"
  c.model.factor.rank = 4           # placeholder: replaced per layer from cr

  c.integrator.name = a.method      # dense|kls|factors|condlr
  c.integrator.adaptive = False     # fixed rank (KLS)
  c.integrator.variant = a.variant  # condlr: mean|approx_orth
  c.integrator.kappa_tau = a.tau    # condlr approx_orth: kappa(S) <= 1 + tau

  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.1   # paper (LeNet5)
  c.optimizer.momentum = 0.3        # paper (LeNet5)
  c.optimizer.schedule = "constant"

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 125          # steps
  c.train.log_every = 20            # steps
  c.train.checkpoint_every = 125    # steps
  c.diagnostics.every = 25          # steps (kappa over training)
  c.diagnostics.heavy_tail = False
  c.logging.progress = False
  if a.method == "dense":
    c.model.factor.kind = c.model.factor.conv_kind = "dense"

  if a.runlocal:
    cu.shrink_for_local(c)
    c.study.attack_examples = 64
    c.study.eps = (0.0, 0.05)
  return c


def get_sweep(arg=None):
  """dense, then per cr: kls, factors, condlr mean, approx_orth x tau."""
  runlocal = "runlocal" in (arg or "")
  dense = [{"integrator.name": "dense", "model.factor.kind": "dense",
            "model.factor.conv_kind": "dense"}]
  # Plain factors diverged at the paper's lr 0.1 (NaN at step 7 in our
  # run, cr 0.5), so they train at lr 0.01; every other method uses 0.1.
  methods = [{"integrator.name": "kls"},
             {"integrator.name": "factors", "optimizer.learning_rate": 0.01},
             {"integrator.name": "condlr", "integrator.variant": "mean"}]
  methods += [{"integrator.name": "condlr", "integrator.variant": "approx_orth",
               "integrator.kappa_tau": t} for t in (0.1, 0.5)]
  if runlocal:
    return cu.product(cu.sweep("study.cr", [0.8]), [methods[3]])
  # Ordered so that a cut-short run still has every method family at both
  # compressions before the second approx_orth tolerance.
  order = [(0.5, 0), (0.5, 1), (0.5, 2), (0.8, 2), (0.8, 0), (0.8, 1),
           (0.5, 3), (0.8, 3), (0.5, 4), (0.8, 4)]
  return cu.chain(dense, [{"study.cr": cr, **methods[i]} for cr, i in order])
