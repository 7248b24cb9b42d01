"""The FAE objective: `||x_hat - x||^2 + beta * KL(q(z|x) || N(0, I))`, per feature element.

Normalisation (one convention for both terms): the LDM objective of one example is the squared
error summed over its N x D feature elements plus `beta` times the KL summed over its h x w x c
latent elements. We divide that whole per-example objective by N x D and average over the batch:

  loss = mean_elements((x_hat - x)^2) + beta * mean_batch(KL_sum) / (N * D)

So `beta` means exactly what it means in LDM / VA-VAE (the KL's weight against the *summed*
squared error), while the loss and its gradients stay O(1) whatever N and D are (gradient
clipping and Adam's epsilon see the same scale for the demo and ImageNet). The effective weight
of the KL against the per-element MSE is `beta / (N * D)`: 1e-6 / (256 x 1536) = 2.5e-12 on
ImageNet, 1e-6 / (64 x 384) = 4.1e-11 on the demo. (Before this convention the KL was a
per-example sum against a per-element mean, i.e. N x D = 3.9e5 times stronger on ImageNet than
the LDM weight of the same name.)

beta defaults to 1e-6 (our choice; the paper does not state it; LDM-style KL autoencoders use
it); at this weight the KL only keeps the posterior variance from collapsing and the latent
scale bounded while reconstruction dominates. The `beta` sweep in both configs measures it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fae_jax.evaluation import features
from fae_jax.models import fae as fae_model

DEFAULT_BETA = 1e-6


def fae_loss(
  x: jax.Array,
  x_hat: jax.Array,
  mean: jax.Array,
  logvar: jax.Array,
  *,
  beta: float = DEFAULT_BETA,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FAE loss and metrics.

  Args:
    x: target tokens `[B, N, D]`.
    x_hat: reconstruction `[B, N, D]`.
    mean, logvar: posterior parameters `[B, h, w, c]`.
    beta: KL weight.

  Returns:
    `(loss, metrics)`; every metric is float32: scalars `loss`, `rec_mse`, `kl` (summed over the
    latent, per example; the loss weighs it by `beta / (N * D)`, see the module docstring),
    `feature_cosine` (mean per-token cosine of x and x_hat), `relative_mse`
    (`||x_hat - x||^2 / ||x||^2` over the batch), `posterior_std_mean`, and `[c]` vectors
    `latent_mean`, `latent_std` (of the posterior mean over batch and positions) and
    `kl_per_channel` (per example; sums to `kl`).
  """
  if x.shape != x_hat.shape:
    raise ValueError(f"fae_loss: x {x.shape} and x_hat {x_hat.shape} differ in shape.")
  if mean.shape != logvar.shape:
    raise ValueError(f"fae_loss: mean {mean.shape} and logvar {logvar.shape} differ in shape.")
  x = x.astype(jnp.float32)
  x_hat = x_hat.astype(jnp.float32)
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  batch = x.shape[0]
  channels = mean.shape[-1]
  feature_elements = x.shape[1] * x.shape[2]  # N * D per example

  rec = jnp.mean(jnp.square(x_hat - x))
  kl_elem = fae_model.kl_to_standard_normal(mean, logvar)
  kl_per_channel = jnp.sum(kl_elem.reshape(-1, channels), axis=0) / batch
  kl = jnp.sum(kl_elem) / batch
  loss = rec + beta * kl / feature_elements

  flat_mean = mean.reshape(-1, channels)
  metrics = {
    "loss": loss,
    "rec_mse": rec,
    "kl": kl,
    "feature_cosine": jnp.mean(features.cosine_similarity(x, x_hat)),
    "relative_mse": features.relative_mse(x, x_hat),
    "posterior_std_mean": jnp.mean(fae_model.std(logvar)),
    "latent_mean": jnp.mean(flat_mean, axis=0),
    "latent_std": jnp.std(flat_mean, axis=0),
    "kl_per_channel": kl_per_channel,
  }
  return loss, metrics
