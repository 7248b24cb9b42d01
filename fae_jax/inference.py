"""Jitted inference of a trained run: image -> features -> latent -> features -> image.

Shared by `fae_jax.autoencoder.Autoencoder`, the `pixel` stage's evaluation and the `evaluate`
stage, so the reported metrics and the public API run the same compiled computation. Every
weight is an argument of the jitted functions, never a closure constant.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range
from fae_jax.models.resize import resize_bicubic


def quantize(images: jax.Array) -> jax.Array:
  """Floats in [-1, 1] -> uint8, exactly `fae_jax.evaluation.grids.to_uint8`, jittable."""
  return jnp.clip(jnp.rint((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def resize_images(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`[B, H, W, C]` floats -> `[B, *size, C]` (antialiased PyTorch bicubic); identity if equal."""
  if tuple(images.shape[1:3]) == tuple(size):
    return images
  return resize_bicubic(images, tuple(size), antialias=True)


@dataclasses.dataclass(frozen=True)
class InferenceFns:
  """Jitted inference functions; every weight is an argument, never a constant.

  Attributes:
    features: `(encoder_params, uint8 images [B, H, W, 3]) -> [B, N, D]` frozen-encoder features.
    encode: `(fae_params, features [B, N, D]) -> [B, h, w, c]` posterior mean.
    decode: `(fae_params, decoder_params, latents [B, h, w, c]) -> uint8 [B, H, W, 3]` at the
      data resolution (feature decoder, pixel decoder, resize, quantise).
    decode_features: `(decoder_params, features [B, N, D]) -> uint8 [B, H, W, 3]`.
  """

  features: Callable[..., jax.Array]
  encode: Callable[..., jax.Array]
  decode: Callable[..., jax.Array]
  decode_features: Callable[..., jax.Array]


@functools.lru_cache(maxsize=8)
def make_inference_fns(
  spec: EncoderSpec,
  fae_config: fae_model.FaeConfig | None,
  decoder_cfg: pd.PixelDecoderConfig,
  image_size: tuple[int, int],
  *,
  encoder_dtype: Any = jnp.float32,
  fae_dtype: Any = jnp.float32,
  decoder_dtype: Any = jnp.float32,
) -> InferenceFns:
  """The `pixel` stage's evaluation and `fae_jax.autoencoder.Autoencoder` both use these.

  Cached on the (hashable) configs, so loading the same run again reuses the compiled code.
  """
  decoder = pd.PixelDecoder(decoder_cfg, dtype=jnp.dtype(decoder_dtype))
  fae = fae_model.Fae(fae_config, dtype=jnp.dtype(fae_dtype)) if fae_config is not None else None

  def need_fae():
    if fae is None:
      raise ValueError("These inference functions were built without an FAE config.")
    return fae

  def to_images(tokens, decoder_params):
    out = decoder.apply({"params": decoder_params}, tokens)
    return quantize(resize_images(out, image_size))

  @jax.jit
  def features(encoder_params, images):
    x = images_to_model_range(images)
    return encode_images(spec, encoder_params, x, dtype=jnp.dtype(encoder_dtype))

  @jax.jit
  def encode_fn(fae_params, feats):
    mean, _ = need_fae().apply({"params": fae_params}, feats, method=fae_model.Fae.encode)
    return mean

  @jax.jit
  def decode(fae_params, decoder_params, latents):
    x_hat = need_fae().apply(
      {"params": fae_params}, latents.astype(jnp.float32), method=fae_model.Fae.decode
    )
    return to_images(x_hat, decoder_params)

  @jax.jit
  def decode_features(decoder_params, feats):
    return to_images(feats.astype(jnp.float32), decoder_params)

  return InferenceFns(features, encode_fn, decode, decode_features)
