"""Pixel-decoder objective: reconstruction + perceptual + adversarial (after TiTok / VQGAN).

```
loss = rec_weight * rec(target, recon) + perc_weight * perceptual(target, recon)
       + [step >= gan_start] * gan_weight * g_hinge(D(recon))
```
Images are NHWC in [-1, 1]; the decoder output `recon` is unbounded and never clipped inside a
loss (clipping would zero the gradient of out-of-range pixels).

Perceptual terms (`perceptual_fn(target, recon) -> scalar`):
  * `dino_feature_loss`: feature matching in the frozen encoder's own feature space (DINOv2
    here); offline, the demo default.
  * `lpips_loss`: LPIPS-VGG (`fae_jax.models.lpips`) with weights converted from the official
    files (`python -m fae_jax.convert lpips ...`).
Both take their frozen weights as arguments: build the closure (`functools.partial`) INSIDE the
jitted train step from params passed to it, so the weights are sharded inputs, not constants.

Adversarial terms: hinge losses on the logits of `fae_jax.models.discriminator`, switched on at
`gan_start` with `jnp.where` (jittable, one compiled step for the whole run). The VQGAN adaptive
weight balances the generator term against the reconstruction terms by their gradient norms at
the decoder's last layer (`last_layer_grad_norms`, `adaptive_gan_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from fae_jax.models.lpips import Lpips

# Path of the pixel decoder's final projection kernel inside its params (`PixelDecoder.head`).
LAST_LAYER: tuple[str, ...] = ("head", "kernel")
REC_KINDS = ("l1", "l2")
ADAPTIVE_EPS = 1e-4

PerceptualFn = Callable[[jax.Array, jax.Array], jax.Array]


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _check_images(target: jax.Array, recon: jax.Array, what: str) -> None:
  if target.shape != recon.shape or target.ndim != 4:
    raise ValueError(
      f"{what}: target {tuple(target.shape)} and recon {tuple(recon.shape)} must both be "
      "images [B, H, W, C] of the same shape."
    )


# ----------------------------------------------------------------------------------------------
# Reconstruction and perceptual terms.
# ----------------------------------------------------------------------------------------------


def reconstruction_loss(target: jax.Array, recon: jax.Array, kind: str = "l1") -> jax.Array:
  """Mean absolute ('l1') or squared ('l2') error over every pixel and channel, float32."""
  if kind not in REC_KINDS:
    raise ValueError(f"Unknown reconstruction loss {kind!r}; choose one of {REC_KINDS}.")
  diff = _f32(recon) - _f32(target)
  return jnp.mean(jnp.abs(diff)) if kind == "l1" else jnp.mean(jnp.square(diff))


def dino_feature_loss(
  encode_fn: Callable[[jax.Array], jax.Array], images: jax.Array, recon: jax.Array
) -> jax.Array:
  """Mean squared distance between frozen-encoder features of `recon` and of `images`.

  Args:
    encode_fn: images `[B, H, W, 3]` in [-1, 1] -> features `[B, N, D]` (the frozen DINOv2
      wrapper, which resizes and normalises itself); differentiable in its input.
    images: targets `[B, H, W, 3]`; their features are a constant (stop_gradient).
    recon: reconstructions `[B, H, W, 3]`; the gradient flows through the encoder into them.

  Returns:
    Scalar float32, the mean over batch, tokens and channels of `(f(recon) - f(images))^2`.

  Why MSE and not 1 - cosine: our features are per-token standardised (`no_affine`: zero mean,
  unit variance over D), and for such tokens `mean_d (a - b)^2 = 2 (1 - cos(a, b))`; MSE is
  the same objective there, and it also stays meaningful for the 'affine'/'none' variants
  whose token norms carry information. It is the loss the FAE itself minimises on features.
  """
  _check_images(images, recon, "dino_feature_loss")
  return dino_feature_loss_to(encode_fn, encode_fn(images), recon)


def dino_feature_loss_to(
  encode_fn: Callable[[jax.Array], jax.Array], target_feats: jax.Array, recon: jax.Array
) -> jax.Array:
  """`dino_feature_loss` against given target features `[B, N, D]` (e.g. the feature cache's).

  The targets are a constant (stop_gradient); the gradient flows through `encode_fn` into
  `recon` `[B, H, W, 3]`.
  """
  target_feats = jax.lax.stop_gradient(_f32(target_feats))
  recon_feats = _f32(encode_fn(recon))
  if target_feats.shape != recon_feats.shape:
    raise ValueError(
      f"dino_feature_loss: the targets' features are {target_feats.shape} and encode_fn gave "
      f"{recon_feats.shape} for the reconstructions."
    )
  return jnp.mean(jnp.square(recon_feats - target_feats))


def lpips_loss(
  lpips_params: Any, target: jax.Array, recon: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
  """Batch mean of LPIPS-VGG(recon, target); `lpips_params` as `convert_lpips` returns them."""
  _check_images(target, recon, "lpips_loss")
  dist = Lpips(dtype=dtype).apply({"params": lpips_params}, _f32(recon), _f32(target))
  return jnp.mean(dist)


# ----------------------------------------------------------------------------------------------
# Adversarial terms.
# ----------------------------------------------------------------------------------------------


def d_hinge_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """Discriminator hinge loss `0.5 * (mean relu(1 - real) + mean relu(1 + fake))`.

  The 0.5 is taming's `hinge_d_loss` (VQGAN, TiTok), so discriminator learning rates and
  weights carry over from those recipes. Means are over every logit (batch and patches).
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
  return 0.5 * (loss_real + loss_fake)


def g_hinge_loss(fake_logits: jax.Array) -> jax.Array:
  """Generator hinge loss `-mean(fake_logits)`."""
  return -jnp.mean(_f32(fake_logits))


def adaptive_gan_weight(
  rec_grad_norm: jax.Array,
  gan_grad_norm: jax.Array,
  max_weight: float = 1e4,
  eps: float = ADAPTIVE_EPS,
) -> jax.Array:
  """VQGAN adaptive weight `clip(||g_rec|| / (||g_gan|| + eps), 0, max_weight)`, no gradient.

  `g_rec`, `g_gan`: gradients of the (weighted) reconstruction + perceptual loss and of the
  generator loss w.r.t. the decoder's last layer (`last_layer_grad_norms`). Multiply the result
  by a base GAN weight (taming's `discriminator_weight`) to get `pixel_loss(gan_weight=...)`.
  """
  weight = _f32(rec_grad_norm) / (_f32(gan_grad_norm) + eps)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def last_layer_grad_norms(
  terms_fn: Callable[[Any], tuple[jax.Array, jax.Array]],
  params: Any,
  path: tuple[str, ...] = LAST_LAYER,
) -> tuple[jax.Array, jax.Array]:
  """Norms of the gradients of two loss terms w.r.t. one parameter (the decoder's last layer).

  The functional counterpart of taming's `torch.autograd.grad(loss, last_layer)`: the leaf at
  `path` is made the only differentiated input, `terms_fn` is linearised once (`jax.vjp`) and
  pulled back twice, with cotangents (1, 0) and (0, 1). Only the ops that depend on that leaf
  (head, unpatchify, the loss networks) are differentiated, not the decoder blocks; inside the
  jitted train step XLA shares the forward pass with the main gradient computation.

  Args:
    terms_fn: `params -> (rec_term, gan_term)`, two scalars (e.g. the weighted rec + perceptual
      loss and `g_hinge_loss(D(recon))`), computed from a decoder forward with these params.
    params: the pixel decoder's params (the tree `PixelDecoder.init(...)['params']`).
    path: keys to the last layer; default `('head', 'kernel')`.

  Returns:
    `(||d rec / d W||, ||d gan / d W||)`, float32 scalars.
  """
  flat = traverse_util.flatten_dict(params)
  if path not in flat:
    raise KeyError(f"last_layer_grad_norms: no parameter at {'/'.join(path)} in the params.")

  def terms_of_leaf(leaf):
    tree = traverse_util.unflatten_dict({**flat, path: leaf})
    rec, gan = terms_fn(tree)
    return _f32(rec), _f32(gan)

  (rec, gan), pullback = jax.vjp(terms_of_leaf, flat[path])
  one, zero = jnp.ones_like(rec), jnp.zeros_like(gan)
  (g_rec,) = pullback((one, zero))
  (g_gan,) = pullback((zero, one))
  return jnp.linalg.norm(_f32(g_rec).ravel()), jnp.linalg.norm(_f32(g_gan).ravel())


def gan_active(step: jax.Array | int, gan_start: jax.Array | int) -> jax.Array:
  """Boolean scalar `step >= gan_start` (traced-friendly)."""
  return jnp.asarray(step) >= jnp.asarray(gan_start)


def discriminator_loss(
  real_logits: jax.Array,
  fake_logits: jax.Array,
  *,
  step: jax.Array | int,
  gan_start: jax.Array | int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Hinge loss of the discriminator, exactly zero (and zero gradient) before `gan_start`.

  `fake_logits` must come from `stop_gradient(recon)`: the decoder is not updated by this loss.

  Returns:
    `(loss, metrics)` with `d_loss`, `logits_real`, `logits_fake` (means), `gan_active`.
  """
  active = gan_active(step, gan_start)
  d = d_hinge_loss(real_logits, fake_logits)
  loss = jnp.where(active, d, 0.0)
  metrics = {
    "d_loss": loss,
    "logits_real": jnp.mean(_f32(real_logits)),
    "logits_fake": jnp.mean(_f32(fake_logits)),
    "gan_active": active.astype(jnp.float32),
  }
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# The decoder objective.
# ----------------------------------------------------------------------------------------------


def pixel_loss(
  target: jax.Array,
  recon: jax.Array,
  *,
  rec: str = "l1",
  rec_weight: float = 1.0,
  perceptual_fn: PerceptualFn | None = None,
  perc_weight: float = 1.0,
  gan_logits_fake: jax.Array | None = None,
  gan_weight: jax.Array | float = 0.0,
  step: jax.Array | int = 0,
  gan_start: jax.Array | int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Pixel-decoder loss and metrics.

  Args:
    target: images `[B, H, W, C]` in [-1, 1].
    recon: decoder output `[B, H, W, C]` (unbounded).
    rec: 'l1' or 'l2' reconstruction term.
    rec_weight: its weight.
    perceptual_fn: `(target, recon) -> scalar` (e.g. `partial(dino_feature_loss, encode)` or
      `partial(lpips_loss, lpips_params)`); None for no perceptual term.
    perc_weight: its weight.
    gan_logits_fake: discriminator logits of `recon` (gradient flowing into recon; the
      discriminator params are not updated by this loss); None for no GAN term.
    gan_weight: weight of the generator hinge loss (a float, or `base * adaptive_gan_weight`).
    step, gan_start: the GAN term is `jnp.where(step >= gan_start, gan_weight * g, 0)`, so it
      and its gradient are exactly zero before `gan_start` (a select, not a multiplication,
      so no NaN/inf of the discriminator leaks into the gradient).

  Returns:
    `(loss, metrics)`, float32 scalars: `loss`, `rec` (unweighted), `l1`, `l2`, `psnr`, and,
    when present, `perceptual` (unweighted), `g_loss` (unweighted generator hinge),
    `gan_weight` (the effective weight, 0 before `gan_start`), `gan_active`.
  """
  _check_images(target, recon, "pixel_loss")
  target = _f32(target)
  recon = _f32(recon)
  l1 = reconstruction_loss(target, recon, "l1")
  l2 = reconstruction_loss(target, recon, "l2")
  if rec not in REC_KINDS:
    raise ValueError(f"Unknown reconstruction loss {rec!r}; choose one of {REC_KINDS}.")
  rec_term = l1 if rec == "l1" else l2
  loss = rec_weight * rec_term
  metrics = {"rec": rec_term, "l1": l1, "l2": l2, "psnr": psnr(target, recon)}
  if perceptual_fn is not None:
    perc = _f32(perceptual_fn(target, recon))
    loss = loss + perc_weight * perc
    metrics["perceptual"] = perc
  if gan_logits_fake is not None:
    active = gan_active(step, gan_start)
    g = g_hinge_loss(gan_logits_fake)
    weight = jnp.where(active, _f32(gan_weight), 0.0)
    loss = loss + jnp.where(active, _f32(gan_weight) * g, 0.0)
    metrics.update(g_loss=g, gan_weight=weight, gan_active=active.astype(jnp.float32))
  metrics["loss"] = loss
  return loss, metrics


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def psnr(
  target: jax.Array, recon: jax.Array, *, max_db: float = 100.0, reduce: bool = True
) -> jax.Array:
  """Peak signal-to-noise ratio in dB of images in [-1, 1], per image then averaged.

  Both images are clipped to [-1, 1] (what a saved image would hold) and mapped to [0, 1]
  (`(x + 1) / 2`, peak 1: the same number as the usual uint8 PSNR with peak 255, without the
  rounding). Per image: `-10 log10(mean (a - b)^2)` over H, W, C. Identical images have infinite
  PSNR; it is capped at `max_db` (100 dB: an MSE of 1e-10) so a batch mean stays finite.

  Returns:
    Scalar float32 (mean over the batch), or `[B]` with `reduce=False`.
  """
  _check_images(target, recon, "psnr")
  a = (jnp.clip(_f32(target), -1.0, 1.0) + 1.0) * 0.5
  b = (jnp.clip(_f32(recon), -1.0, 1.0) + 1.0) * 0.5
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  per_image = -10.0 * jnp.log10(jnp.maximum(mse, 10.0 ** (-max_db / 10.0)))
  return jnp.mean(per_image) if reduce else per_image
