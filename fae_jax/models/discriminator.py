"""PatchGAN discriminator for the pixel decoder's adversarial loss.

The layout of taming-transformers' `NLayerDiscriminator` (pix2pix PatchGAN; VQGAN, TiTok),
images `[B, H, W, C]` in [-1, 1] -> logits `[B, h', w', 1]`, one per overlapping patch:

```
Conv4x4/s2(C -> n)            LeakyReLU(0.2)
Conv4x4/s2(n -> 2n)   norm    LeakyReLU(0.2)     } num_layers - 1 strided layers,
Conv4x4/s2(2n -> 4n)  norm    LeakyReLU(0.2)     } widths n * min(2^k, 8)
Conv4x4/s1(4n -> 8n)  norm    LeakyReLU(0.2)
Conv4x4/s1(8n -> 1)                               (padding 1 everywhere)
```
With n = 64 and 3 layers: 2,765,633 params (GroupNorm); 256 px -> 30x30 logits, 32 px -> 2x2.

Norm: GroupNorm (gcd(32, channels) groups, i.e. 32 for every default width) or none, instead of taming's
BatchNorm. BatchNorm would carry running statistics (mutable state outside `params`), couple
the samples of a batch (real and fake batches get different statistics, and under data
parallelism the statistics depend on the per-device batch), and behave differently in train and
eval. GroupNorm normalises each sample on its own, so the discriminator stays a pure function of
`(params, images)`. Convolutions followed by a norm have no bias (the norm's offset replaces it).
Init: N(0, 0.02) conv kernels, as taming's `weights_init`; GroupNorm scale 1, offset 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fae_jax.models.config_base import JsonConfig

Dtype = Any

_NORMS = ("group", "none")
_CONV_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig(JsonConfig):
  """PatchGAN shape.

  Attributes:
    base_channels: n, width of the first convolution.
    num_layers: strided convolutions (3 in taming's default).
    norm: 'group' or 'none'.
    num_groups: GroupNorm groups (gcd with the channel count, so any width works).
    negative_slope: LeakyReLU slope.
  """

  base_channels: int = 64
  num_layers: int = 3
  norm: str = "group"
  num_groups: int = 32
  negative_slope: float = 0.2

  def __post_init__(self):
    if self.norm not in _NORMS:
      raise ValueError(f"DiscriminatorConfig.norm={self.norm!r} is not one of {_NORMS}.")
    if self.num_layers < 1 or self.base_channels < 1 or self.num_groups < 1:
      raise ValueError("DiscriminatorConfig: num_layers, base_channels, num_groups must be >= 1.")


class PatchDiscriminator(nn.Module):
  """`[B, H, W, C]` images -> `[B, h', w', 1]` float32 logits (H, W >= 3 * 2^num_layers)."""

  config: DiscriminatorConfig = DiscriminatorConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    if images.ndim != 4:
      raise ValueError(f"PatchDiscriminator expects images [B, H, W, C], got {images.shape}.")
    pad = ((1, 1), (1, 1))

    def conv(x, features, stride, name, bias=True):
      return nn.Conv(
        features,
        (4, 4),
        strides=(stride, stride),
        padding=pad,
        use_bias=bias,
        kernel_init=_CONV_INIT,
        dtype=self.dtype,
        name=name,
      )(x)

    def act(x):
      return jax.nn.leaky_relu(x, c.negative_slope)

    x = act(conv(images.astype(jnp.float32), c.base_channels, 2, "conv_0"))
    use_norm = c.norm == "group"
    for k in range(1, c.num_layers + 1):
      # The last of these keeps the resolution (stride 1), as in pix2pix.
      stride = 2 if k < c.num_layers else 1
      width = c.base_channels * min(2**k, 8)
      x = conv(x, width, stride, f"conv_{k}", bias=not use_norm)
      if use_norm:
        x = nn.GroupNorm(
          num_groups=math.gcd(c.num_groups, width), epsilon=1e-5, dtype=self.dtype, name=f"norm_{k}"
        )(x)
      x = act(x)
    x = conv(x, 1, 1, f"conv_{c.num_layers + 1}")
    return x.astype(jnp.float32)
