"""The pixel decoder's objective per training phase, assembled from `fae_jax.losses.pixel` terms.

`rec_weight * L1|L2 + perc_weight * perceptual + GAN`, with
  * perceptual 'dino': MSE between the frozen encoder's features of the reconstruction and the
    clean features `x` of the source image (offline; the encoder weights are already there), or
    'lpips' (LPIPS-VGG from weights converted with `python -m fae_jax.convert lpips`), or 'none';
    in the phases `loss.perc_phases`, on every `B / loss.perc_examples`-th example of the batch
    (0: all), on the phase-local steps `step % loss.perc_every == 0` (a `lax.cond`: on the other
    steps the frozen encoder does not run and the term is 0);
  * GAN: a PatchGAN (`fae_jax.models.discriminator`, the discriminator of VQGAN and TiTok) with
    hinge losses, both switched on at the phase-local step `gan_start`, the generator term
    optionally scaled by VQGAN's adaptive weight. Generator and discriminator share ONE param tree
    `{'decoder', 'disc'}` and ONE optimizer: the loss is `generator terms(decoder, sg(disc)) +
    d_hinge(disc, sg(recon))`, so each part only receives its own gradient. The gate needs the
    step: the train loop passes the traced `state.step` (`loop.train(..., loss_takes_step=True)`).

Inputs of phase `noisy`: frozen encoder features `x + noise`; of phase `finetune`: the frozen
FAE's reconstruction `x_hat = D(z)`, `z ~ q(z | x)` (or its mean). Targets are the images in
[-1, 1], resized to the decoder's output size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fae_jax.inference import resize_images
from fae_jax.losses import pixel as pixel_terms
from fae_jax.models import discriminator as disc_model
from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range

PHASES = ("noisy", "finetune")


@dataclasses.dataclass(frozen=True)
class PixelModels:
  """The networks of the pixel decoder's objective (the frozen ones' weights come separately)."""

  spec: EncoderSpec
  decoder: pd.PixelDecoder
  disc: disc_model.PatchDiscriminator | None
  fae: fae_model.Fae | None
  encoder_dtype: Any


def perceptual_active(loss_cfg, phase: str) -> bool:
  """Whether phase `phase` has a perceptual term (`perceptual`, `perc_weight`, `perc_phases`)."""
  phases = tuple(loss_cfg.get("perc_phases", PHASES))
  return loss_cfg.perceptual != "none" and float(loss_cfg.perc_weight) > 0 and phase in phases


def perceptual_subset(batch_size: int, perc_examples: int) -> int:
  """The stride that picks `perc_examples` of a batch for the perceptual term (1 = all).

  Every `stride`-th example: with the batch split into contiguous per-device blocks, each device
  keeps the same number of examples when `stride` divides its block.
  """
  if perc_examples <= 0 or perc_examples >= batch_size:
    return 1
  if batch_size % perc_examples:
    raise ValueError(
      f"config.pixel.loss.perc_examples={perc_examples} must divide the batch size "
      f"{batch_size}; pick a divisor (or 0 for the whole batch)."
    )
  return batch_size // perc_examples


def perceptual_every(loss_cfg) -> int:
  """`loss.perc_every`: the perceptual term runs on the phase-local steps divisible by it."""
  every = loss_cfg.get("perc_every", 1)
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(
      f"config.pixel.loss.perc_every must be an integer >= 1 (1 = every step), got {every!r}."
    )
  return every


def perceptual_fn(
  loss_cfg,
  models: PixelModels,
  frozen: dict[str, Any],
  phase: str,
  x: jax.Array,
  batch_size: int,
  step: jax.Array | int = 0,
):
  """`(target, recon) -> scalar` of `loss_cfg.perceptual` in phase `phase`, None when off.

  On every `perceptual_subset(batch_size, loss_cfg.perc_examples)`-th example, on the steps
  with `step % loss_cfg.perc_every == 0` (0 on the others, where the frozen network does not
  run). 'dino' matches the encoder's features of the reconstruction to the clean features `x` of
  the source images (what the decoder's input stands for; one encoder forward less than encoding
  `target`); 'lpips' compares the reconstruction with `target`.
  """
  if not perceptual_active(loss_cfg, phase):
    return None
  stride = perceptual_subset(batch_size, int(loss_cfg.get("perc_examples", 0)))
  every = perceptual_every(loss_cfg)
  if loss_cfg.perceptual == "dino":
    encode_fn = functools.partial(
      encode_images, models.spec, frozen["encoder"], dtype=models.encoder_dtype
    )
    x_sub = x[::stride]

    def term(target, recon):
      del target
      return pixel_terms.dino_feature_loss_to(encode_fn, x_sub, recon[::stride])

  else:

    def term(target, recon):
      return pixel_terms.lpips_loss(frozen["lpips"], target[::stride], recon[::stride])

  if every == 1:
    return term

  def on(target, recon):
    value, vjp = jax.vjp(lambda r: term(target, r).astype(jnp.float32), recon)
    return value, vjp(jnp.ones((), jnp.float32))[0]

  def off(target, recon):
    return jnp.zeros((), jnp.float32), jnp.zeros_like(recon)

  def on_some_steps(target, recon):
    # The branch computes the term's value and its gradient with respect to `recon` itself, on
    # constants: differentiating through a `cond` would make the skipped steps write out zeros
    # for every residual of the frozen network's backward pass (tens of MB per step).
    const = jax.lax.stop_gradient(recon)
    value, grad = jax.lax.cond(jnp.asarray(step) % every == 0, on, off, target, const)
    # The value is `value`; the gradient with respect to `recon` is `grad` (0 off the steps).
    return value + jnp.sum(jax.lax.stop_gradient(grad) * (recon - const))

  return on_some_steps


def make_loss_fn(
  pixel_config: ml_collections.ConfigDict, phase: str, models: PixelModels
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """`(params, batch, rng, frozen, *, step) -> (loss, metrics)` of phase 'noisy' or 'finetune'.

  `pixel_config` is the experiment's `config.pixel` (loss, noise, the phase's `gan_start`).

  `params = {'decoder': ..., ['disc': ...]}`; `frozen` holds what the phase needs of
  `encoder` (features on the fly, 'dino' loss), `fae` (phase `finetune`) and `lpips`.
  """
  p = pixel_config
  loss_cfg, noise = p.loss, p.noise
  gan_start = int(p[phase].gan_start)
  sample_posterior = bool(p.finetune.get("sample_posterior", True))
  out_size = models.decoder.config.image_size
  rec_kind, rec_weight = loss_cfg.rec, float(loss_cfg.rec_weight)
  perc_weight = float(loss_cfg.perc_weight)

  def loss_fn(params, batch, rng, frozen, *, step):
    images = images_to_model_range(batch["image"])
    if "features" in batch:
      x = batch["features"].astype(jnp.float32)
    else:
      x = encode_images(models.spec, frozen["encoder"], images, dtype=models.encoder_dtype)
    x = jax.lax.stop_gradient(x)
    noise_rng, posterior_rng = jax.random.split(rng)
    if phase == "noisy":
      tokens = pd.add_feature_noise(
        x, noise_rng, mode=noise.mode, sigma=float(noise.sigma), tau=float(noise.tau), train=True
      )
    else:
      fae_params = frozen["fae"]
      mean, logvar = models.fae.apply({"params": fae_params}, x, method=fae_model.Fae.encode)
      z = fae_model.sample(mean, logvar, posterior_rng) if sample_posterior else mean
      tokens = models.fae.apply({"params": fae_params}, z, method=fae_model.Fae.decode)
      tokens = jax.lax.stop_gradient(tokens)
    target = resize_images(images, out_size)
    perceptual = perceptual_fn(loss_cfg, models, frozen, phase, x, target.shape[0], step)

    def decode(decoder_params):
      return models.decoder.apply({"params": decoder_params}, tokens)

    recon = decode(params["decoder"])
    common = dict(
      rec=rec_kind, rec_weight=rec_weight, perceptual_fn=perceptual, perc_weight=perc_weight
    )
    if models.disc is None:
      loss, metrics = pixel_terms.pixel_loss(target, recon, **common)
      metrics["gen_loss"] = metrics.pop("loss")
      return loss, metrics

    disc_params = params["disc"]
    frozen_disc = jax.lax.stop_gradient(disc_params)

    def logits(d_params, imgs):
      return models.disc.apply({"params": d_params}, imgs)

    gan_weight = jnp.float32(loss_cfg.gan_weight)
    if loss_cfg.adaptive_gan_weight:

      def terms(decoder_params):
        r = decode(decoder_params)
        rec_terms = rec_weight * pixel_terms.reconstruction_loss(target, r, rec_kind)
        if perceptual is not None:
          rec_terms = rec_terms + perc_weight * perceptual(target, r)
        return rec_terms, pixel_terms.g_hinge_loss(logits(frozen_disc, r))

      def adaptive():
        norms = pixel_terms.last_layer_grad_norms(terms, params["decoder"])
        return pixel_terms.adaptive_gan_weight(*norms, max_weight=float(loss_cfg.adaptive_max))

      # A cond, not a select: before `gan_start` the extra backward pass is skipped entirely.
      active = pixel_terms.gan_active(step, gan_start)
      gan_weight = gan_weight * jax.lax.cond(active, adaptive, lambda: jnp.float32(0.0))
    gen_loss, metrics = pixel_terms.pixel_loss(
      target,
      recon,
      **common,
      gan_logits_fake=logits(frozen_disc, recon),
      gan_weight=gan_weight,
      step=step,
      gan_start=gan_start,
    )
    metrics["gen_loss"] = metrics.pop("loss")
    metrics["gan_term"] = metrics["gan_weight"] * metrics["g_loss"]
    d_loss, d_metrics = pixel_terms.discriminator_loss(
      logits(disc_params, target),
      logits(disc_params, jax.lax.stop_gradient(recon)),
      step=step,
      gan_start=gan_start,
    )
    metrics.update(d_metrics)
    return gen_loss + d_loss, metrics

  return loss_fn
