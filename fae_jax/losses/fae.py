"""The FAE objective: `||x_hat - x||^2 + beta * KL(q(z|x) || N(0, I))`.

Reconstruction is the mean squared error over every element (batch, tokens, channels), so its
scale does not depend on D or N. The KL is summed over the latent (h * w * c) and averaged over
the batch, the usual VAE convention (LDM, VA-VAE, RAE), which makes `beta` comparable to theirs.

beta defaults to 1e-6 (our choice; the paper does not state it). It is the value LDM-style
KL autoencoders and the FAE peers use; at this weight the KL only keeps the posterior variance
from collapsing to zero and the latent scale bounded, while reconstruction dominates.
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
    `(loss, metrics)`; every metric is float32: scalars `loss`, `rec_mse`, `kl` (per example),
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

  rec = jnp.mean(jnp.square(x_hat - x))
  kl_elem = fae_model.kl_to_standard_normal(mean, logvar)
  kl_per_channel = jnp.sum(kl_elem.reshape(-1, channels), axis=0) / batch
  kl = jnp.sum(kl_elem) / batch
  loss = rec + beta * kl

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
