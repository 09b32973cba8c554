"""Intruder dimensions: LoRA vs full fine-tuning of an MLP pre-trained on
Fashion-MNIST classes 0-4, fine-tuned on classes 5-9.

  python -m experiments.intruder_dimensions.run

(the wrapper pre-trains once with `stage=pretrain`, then fine-tunes every
point of this file's sweep from that checkpoint on the second task, and
builds the report). The 10-way head is shared; task accuracy is measured on
the logits of the task's own 5 classes (task-incremental protocol), so
forgetting of task A measures drift of the network, not of the label set.

Fine-tuning: LoRA on fc1 and fc2 (head and biases train in every method),
r in {1, 2, 4, 8, 16, 64}, standard scale alpha / r and rank-stabilised
alpha / sqrt(r) with alpha = 8, Adam 1e-3; full fine-tuning Adam 1e-4;
learning-rate sweep at r = 8 for forgetting. Intruders: left singular
vectors of the merged fc1 / fc2 against those of the pre-trained weights
(lrtrain.diagnostics, intruders/<layer>/maxsim, top 64 logged).
Scale (2-core shared CPU): 784-256-256-10, ~5k examples per task, batch
128, 300 pre-training and 200 fine-tuning steps. `dataset=mnist` runs the
same protocol on MNIST on a connected machine.

References:
  Shuttleworth, Andreas, Torralba, Sharma, "LoRA vs full fine-tuning: an
  illusion of equivalence", 2024.
  Kalajdzievski, "A rank stabilization scaling factor for fine-tuning with
  LoRA", 2023 (rsLoRA).
"""

import ml_collections

from lrtrain import config_utils as cu

RANKS = (1, 2, 4, 8, 16, 64)
SWEEP_LRS = (1e-4, 3e-3, 1e-2)   # plus the default 1e-3, at r = 8
TASK_A = (0, 1, 2, 3, 4)
TASK_B = (5, 6, 7, 8, 9)


def get_config(arg=None):
  """arg: runlocal, dataset, stage (pretrain|finetune), seed, steps."""
  a = cu.parse_arg(arg, runlocal=False, dataset="fashion_mnist",
                   stage="finetune", seed=0, steps=200)
  c = cu.base_config()
  c.seed = a.seed
  c.data.name = a.dataset
  c.data.max_train = 11000          # examples of all classes (~5.5k per task)
  c.data.validation_size = 2000     # examples (~1k per task)

  c.study = ml_collections.ConfigDict()
  c.study.task_a = TASK_A           # pre-training classes
  c.study.task_b = TASK_B           # fine-tuning classes
  c.study.target_accuracy = 0.90    # task-B validation accuracy to match
  c.study.eps = 0.5                 # intruder threshold (count vs k, sweep)
  c.study.k = 10                    # top singular vectors examined
  c.study.layers = ("fc1", "fc2")   # adapted matrices

  c.model.name = "mlp"
  c.model.widths = (256, 256)       # hidden units
  c.model.factor.kind = "lora"
  c.model.factor.rank = 8           # LoRA rank r
  c.model.factor.alpha = 8.0        # scale alpha / r (or alpha / sqrt(r))
  c.model.factor.rank_stabilised = False

  c.integrator.name = "lora"        # lora | dense (full fine-tuning)

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3  # LoRA default
  c.optimizer.schedule = "constant"

  c.train.batch_size = 128          # examples
  c.train.num_steps = a.steps       # steps
  c.train.eval_every = 25           # steps (= diagnostics.every: matched accuracy)
  c.train.log_every = 25            # steps
  c.train.checkpoint_every = 100    # steps
  c.diagnostics.every = 25          # steps
  c.diagnostics.top_k = 64          # maxsim / sv vectors logged
  c.diagnostics.eps = 0.5
  c.diagnostics.heavy_tail = False
  c.logging.progress = False

  if a.stage == "pretrain":
    c.model.factor.kind = "dense"
    c.integrator.name = "dense"
    c.train.num_steps = 300         # steps
    c.train.eval_every = 150
    c.train.checkpoint_every = 150
    c.diagnostics.enabled = False

  if a.runlocal:
    cu.shrink_for_local(c)
    c.model.widths = (32, 32)
    c.diagnostics.top_k = 8
    c.study.k = 4
    c.train.eval_every = 1
    c.diagnostics.every = 1
    c.diagnostics.enabled = a.stage != "pretrain"
  return c


def get_sweep(arg=None):
  """LoRA ranks x scaling, full fine-tuning, learning rates at r = 8."""
  runlocal = "runlocal" in (arg or "")
  ranks = RANKS[:2] if runlocal else RANKS
  lora = cu.product(cu.sweep("model.factor.rank", ranks),
                    cu.sweep("model.factor.rank_stabilised", [False, True]))
  full = [{"model.factor.kind": "dense", "integrator.name": "dense",
           "optimizer.learning_rate": 1e-4}]
  lrs = SWEEP_LRS[:1] if runlocal else SWEEP_LRS
  sweep_lr = cu.product(cu.sweep("model.factor.rank", [8 if not runlocal else 2]),
                        cu.sweep("model.factor.rank_stabilised", [False]),
                        cu.sweep("optimizer.learning_rate", lrs))
  if runlocal:
    return cu.chain(lora[:1], full)
  # Full fine-tuning and the r = 8 learning-rate sweep first, so a run cut
  # short still has both ends of every comparison.
  first = [p for p in lora if p["model.factor.rank"] in (1, 8)
           and not p["model.factor.rank_stabilised"]]
  rest = [p for p in lora if p not in first]
  rest.sort(key=lambda p: (p["model.factor.rank_stabilised"],
                           RANKS.index(p["model.factor.rank"]) % 2))
  return cu.chain(full, first, sweep_lr, rest)
