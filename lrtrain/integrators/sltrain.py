"""SLTrain: plain optax on the factors B, A and the sparse values of
W = scale * B A + S (`lrtrain.factorizations.sltrain`).

The support of S (an int32 leaf) and the scale are frozen: `base.trainable`
hands the optimizer only B, A, the sparse values and the model's other
float leaves, so the support never enters the optimizer state and never
moves. The step is `plain`'s (one forward and one backward pass); this
module adds the check that the model has SLTrain layers. Weight decay, if
any, acts on B, A and the values (`base.decay_mask`); the paper trains with
none.

References:
  Han et al., "SLTrain: a sparse plus low-rank approach for parameter and
  memory efficient pretraining", NeurIPS 2024.
"""

from __future__ import annotations

import optax

from lrtrain import factorizations as fz
from lrtrain.integrators import base, plain

# The factor nodes this method trains.
NEEDS = (fz.SLTrain,)


def make(tx: optax.GradientTransformation, *,
         weight_decay: float = 0.0) -> base.Integrator:
  """The SLTrain step.

  Args:
    tx: the optimizer (the paper: AdamW without weight decay).
    weight_decay: L2 decay on the leaves `base.decay_mask` allows.

  Returns:
    base.Integrator(init, step, resize) with the identity resize; `init`
    raises ValueError for params without an SLTrain node.
  """
  inner = plain.make(tx, method="dense", weight_decay=weight_decay)

  def init(params):
    base.require_nodes(params, NEEDS, "sltrain")
    return inner.init(params)

  return inner._replace(init=init)
