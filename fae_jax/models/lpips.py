"""LPIPS-VGG (Zhang et al. 2018, the `lpips` package, version 0.1) in Flax, NHWC.

```
x, y in [-1, 1] --scale--> VGG16 conv trunk --> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
per layer k: f = feature / ||feature||_channels;  d_k = mean_hw( sum_c w_k,c (f_x - f_y)^2 )
LPIPS(x, y) = sum_k d_k                                                   -> [B]
```

* Scaling layer: `(x - shift) / scale` with the official constants, i.e. the ImageNet mean/std
  expressed for [-1, 1] inputs.
* Trunk: the 13 3x3 convolutions of torchvision's `vgg16().features` (padding 1, ReLU, 2x2
  max-pool between stages), tapped after the last ReLU of each of the 5 stages; the final
  max-pool (`features.30`) is never used.
* Channel-unit normalisation: `f / (sqrt(sum_c f^2) + 1e-10)`, as `lpips.normalize_tensor`.
  The square root goes through a guarded `where`, so a position where every channel is zero
  (dead ReLUs) has value 0 and a finite gradient; torch would give NaN there.
* `lin{k}`: 1x1 convolutions to 1 channel, no bias; trained LPIPS weights are non-negative
  (the official training clamps them), which the converter checks.

Parameter names mirror PyTorch so the conversion map is one-to-one: `net/features_{i}` for
torchvision's `features.{i}` convolutions (i in `VGG16_CONV_INDICES`), `lin{k}` for
`lin{k}.model.1`. The trunk is frozen: the loss uses it only to back-propagate into the images.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# `lpips.pretrained_networks.ScalingLayer` constants.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# Indices of the convolutions in torchvision's `vgg16().features`, grouped by LPIPS stage
# (slice1 = features[0:4], slice2 = [4:9], slice3 = [9:16], slice4 = [16:23], slice5 = [23:30]).
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
  (0, 2),
  (5, 7),
  (10, 12, 14),
  (17, 19, 21),
  (24, 26, 28),
)
VGG16_CONV_INDICES: tuple[int, ...] = tuple(i for stage in VGG16_STAGES for i in stage)
VGG16_STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)


def conv_channels() -> dict[int, tuple[int, int]]:
  """torchvision conv index -> `(in_channels, out_channels)` of the VGG16 trunk."""
  out: dict[int, tuple[int, int]] = {}
  cin = 3
  for stage, cout in zip(VGG16_STAGES, VGG16_STAGE_CHANNELS, strict=True):
    for i in stage:
      out[i] = (cin, cout)
      cin = cout
  return out


def normalize_channels(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """`x / (||x||_2 over the last axis + eps)`, with a NaN-free gradient where `||x|| = 0`."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return x / (norm + eps)


class Vgg16Features(nn.Module):
  """VGG16 conv trunk, `[B, H, W, 3] -> [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]` (NHWC)."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    channels = conv_channels()
    for s, stage in enumerate(VGG16_STAGES):
      if s > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i in stage:
        x = nn.Conv(
          channels[i][1],
          (3, 3),
          padding=((1, 1), (1, 1)),
          dtype=self.dtype,
          name=f"features_{i}",
        )(x)
        x = jax.nn.relu(x)
      taps.append(x)
    return taps


class Lpips(nn.Module):
  """LPIPS-VGG distance. `__call__(x, y)`: images `[B, H, W, 3]` in [-1, 1] -> `[B]` float32.

  H and W must be at least 16 (four 2x2 poolings before the last stage).
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(
        f"Lpips expects two images [B, H, W, 3] of the same shape, got {tuple(x.shape)} and "
        f"{tuple(y.shape)}."
      )
    if min(x.shape[1:3]) < 16:
      raise ValueError(f"Lpips needs images of at least 16x16 pixels, got {x.shape[1:3]}.")
    b = x.shape[0]
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    # One trunk pass over both images: half the kernel launches, same numbers per sample.
    taps = Vgg16Features(dtype=self.dtype, name="net")((both - shift) / scale)
    total = jnp.zeros((b,), jnp.float32)
    for k, feat in enumerate(taps):
      feat = normalize_channels(feat.astype(jnp.float32))
      diff = jnp.square(feat[:b] - feat[b:])
      weighted = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, name=f"lin{k}")(diff)
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total
