"""The frozen encoder as the rest of fae_jax sees it: images in, patch features out.

`FrozenEncoder` owns the preprocessing (resize to the encoder's input size with PyTorch-exact
antialiased bicubic, ImageNet mean/std) and the choice of feature (DESIGN.md): patch tokens after
DINOv2's final LayerNorm with its affine removed (`no_affine`, the default: per-token zero mean,
unit variance, what RAE uses), with the affine (`affine`), or before the final norm (`none`).
CLS and register tokens are dropped.

Images come in NHWC as floats in [-1, 1] (the models' convention); `images_to_model_range`
converts the uint8 batches of the data pipelines.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fae_jax.models.dinov2 import Dinov2, Dinov2Config
from fae_jax.models.resize import resize_bicubic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_MODES = ("affine", "no_affine", "none")


def images_to_model_range(images: jax.Array | np.ndarray) -> jax.Array:
  """uint8 `[B, H, W, 3]` in [0, 255] -> float32 in [-1, 1]."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """What defines the encoder's output: the backbone plus how images reach it."""

  backbone: Dinov2Config
  image_size: int = 224
  features: str = "no_affine"

  def __post_init__(self):
    if self.features not in FEATURE_MODES:
      raise ValueError(
        f"encoder.features={self.features!r} is not one of {FEATURE_MODES} (see DESIGN.md)."
      )
    if self.image_size % self.backbone.patch_size:
      raise ValueError(
        f"encoder.image_size={self.image_size} is not a multiple of the patch size "
        f"{self.backbone.patch_size}; use e.g. {self.image_size // self.backbone.patch_size * 14}."
      )

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.backbone.patch_size
    return side, side

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def feature_dim(self) -> int:
    return self.backbone.width


class FrozenEncoder(nn.Module):
  """`[B, H, W, 3]` images in [-1, 1] -> patch features `[B, N, D]` (float32)."""

  spec: EncoderSpec
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    # Named like the top of a converted checkpoint, so `params` are the backbone's own tree.
    self.backbone = Dinov2(self.spec.backbone, dtype=self.dtype)

  def preprocess(self, images: jax.Array) -> jax.Array:
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    size = self.spec.image_size
    if x.shape[1:3] != (size, size):
      x = resize_bicubic(x, (size, size), antialias=True)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std

  def __call__(self, images: jax.Array) -> jax.Array:
    out = self.backbone(self.preprocess(images))
    if self.spec.features == "affine":
      feats = out["patch"]
    elif self.spec.features == "no_affine":
      feats = out["patch_no_affine"]
    else:
      feats = out["prenorm"][:, 1 + self.spec.backbone.num_registers :]
    return feats.astype(jnp.float32)


def encode_images(spec: EncoderSpec, backbone_params, images: jax.Array, dtype=jnp.float32):
  """Functional form: backbone params (the converted tree) + images in [-1, 1] -> `[B, N, D]`."""
  return FrozenEncoder(spec, dtype=dtype).apply({"params": {"backbone": backbone_params}}, images)
