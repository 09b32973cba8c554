"""A small VGG-style CNN for 8x8 to 32x32 images (no BatchNorm).

conv1 32 - conv2 32 - pool - conv3 64 - conv4 64 - pool - conv5 128 - pool
- flatten - fc1 (128) - head. 3x3 SAME convs with relu, 2x2 max pools
(floor). Layer paths: 'conv1'..'conv5', 'fc1', 'head'.

References:
  Simonyan & Zisserman, "Very deep convolutional networks for large-scale
  image recognition", ICLR 2015 (the pattern, at a CPU-friendly size).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from lrtrain.layers import Conv, Dense, ImageClassifier, max_pool_2x2

CHANNELS = (32, 32, "pool", 64, 64, "pool", 128, "pool")
FC_WIDTH = 128


def check_input(input_shape: tuple) -> None:
  """Raises ValueError unless input_shape is (h, w, c) with h, w >= 8."""
  if len(input_shape) != 3 or min(input_shape[:2]) < 8:
    raise ValueError(f"vgg needs (h, w, c) images with h, w >= 8, got "
                     f"input_shape={input_shape}")


class VGG(ImageClassifier):
  """Small VGG; kernels per `policy` (models.FactorPolicy)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    i = 0
    for c in CHANNELS:
      if c == "pool":
        x = max_pool_2x2(x)
        continue
      i += 1
      name = f"conv{i}"
      x = Conv(c, (3, 3), padding="SAME", factor=self.policy.spec(name, conv=True),
               impl=self.impl, name=name)(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(Dense(FC_WIDTH, factor=self.policy.spec("fc1"), name="fc1")(x))
    return Dense(self.num_classes, factor=self.policy.spec("head"), name="head")(x)
