"""Fully connected network: flatten, hidden layers fc1..fcK (relu), head.

Layer paths: 'fc1', ..., 'fcK' (K = len(widths)) and 'head'.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022 (the 5-layer
  MLP of the DLRT MNIST experiments is MLP(widths=(784,) * 4)).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from lrtrain.layers import Dense


class MLP(nn.Module):
  """relu MLP with any widths; kernels per `policy` (models.FactorPolicy)."""
  widths: tuple[int, ...]
  num_classes: int
  policy: object

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout / batch statistics
    x = x.reshape(x.shape[0], -1)
    for i, w in enumerate(self.widths):
      name = f"fc{i + 1}"
      x = nn.relu(Dense(w, factor=self.policy.spec(name), name=name)(x))
    return Dense(self.num_classes, factor=self.policy.spec("head"), name="head")(x)
