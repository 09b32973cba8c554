"""LeNet5 as in the DLRT experiments.

conv1 (20 filters 5x5, VALID) - relu - maxpool 2x2 - conv2 (50 filters 5x5,
VALID) - relu - maxpool 2x2 - flatten (800 for 28x28 inputs) - fc1 (500) -
relu - head (classes). Layer paths: 'conv1', 'conv2', 'fc1', 'head'.

References:
  Schotthoefer et al., "Low-rank lottery tickets", NeurIPS 2022, Sec. 6.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from lrtrain.layers import Conv, Dense, ImageClassifier, max_pool_2x2

MIN_SIDE = 16  # two VALID 5x5 convs and two 2x2 pools need >= 16 pixels


def check_input(input_shape: tuple) -> None:
  """Raises ValueError unless input_shape is (h, w, c) with h, w >= 16."""
  if len(input_shape) != 3 or min(input_shape[:2]) < MIN_SIDE:
    raise ValueError(f"lenet5 needs (h, w, c) images with h, w >= {MIN_SIDE}, "
                     f"got input_shape={input_shape}; use model.name='mlp' or "
                     "'vgg' for small inputs such as 8x8 digits")


def _pool(x):
  return max_pool_2x2(x)


class LeNet5(ImageClassifier):
  """LeNet5; kernels per `policy` (models.FactorPolicy)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    p = self.policy
    x = Conv(20, (5, 5), padding="VALID", factor=p.spec("conv1", conv=True),
             impl=self.impl, name="conv1")(x)
    x = _pool(nn.relu(x))
    x = Conv(50, (5, 5), padding="VALID", factor=p.spec("conv2", conv=True),
             impl=self.impl, name="conv2")(x)
    x = _pool(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Dense(500, factor=p.spec("fc1"), name="fc1")(x))
    return Dense(self.num_classes, factor=p.spec("head"), name="head")(x)
