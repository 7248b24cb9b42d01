"""TarFlow training objective: exact negative log-likelihood of noise-augmented latents.

```
x~   = x + noise_sigma * eps,  eps ~ N(0, I)          (STARFlow: sigma 0.3 on SD-VAE latents)
y~   = null class with probability class_dropout        (for classifier-free guidance)
z, logdet = flow(x~, y~)
NLL  = 0.5 |z|^2 + 0.5 D log(2 pi) - logdet             (nats per example, D = h * w * c)
loss = mean_batch(NLL) / D                              (nats per dimension)
bpd  = mean_batch(NLL) / (D ln 2)                       (bits per dimension)
```

Constant handling: the NLL is that of the continuous density of the noise-augmented latent and
includes the Gaussian normalisation `0.5 D log(2 pi)` (it does not change the gradients, but
makes the number an honest log-density). There is no dequantisation offset (no `log 256` term):
the latents are continuous, not 8-bit pixels, so bits/dim can be negative and is comparable only
between models trained on the same latents with the same `noise_sigma`. STARFlow's printed loss
is `0.5 mean(z^2) - mean(logdet)`, i.e. our `loss - 0.5 log(2 pi)`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fae_jax.models import tarflow


def add_noise(x: jax.Array, sigma: float, rng: jax.Array) -> jax.Array:
  """Gaussian augmentation `x + sigma * eps`, float32 (float64 if x is), shape of x."""
  dtype = jnp.promote_types(jnp.float32, x.dtype)
  x = x.astype(dtype)
  if sigma == 0:
    return x
  return x + sigma * jax.random.normal(rng, x.shape, dtype)


def drop_labels(y: jax.Array, rng: jax.Array, rate: float, null_class: int) -> jax.Array:
  """Replaces each label by `null_class` with probability `rate`. `y: [B]` int."""
  if rate <= 0:
    return y
  drop = jax.random.bernoulli(rng, rate, y.shape)
  return jnp.where(drop, jnp.asarray(null_class, y.dtype), y)


def nll_terms(
  params: Any, model: tarflow.TarFlow, x: jax.Array, y: jax.Array | None
) -> dict[str, jax.Array]:
  """Per-example `nll`, `prior` (`0.5 |z|^2`) and `logdet`, each `[B]`, for latents `x` as
  given (no noise, no label dropout). `params` is the model's `params` collection."""
  z, logdet = model.apply({"params": params}, x, y)
  d = model.config.num_dims
  prior = 0.5 * jnp.sum(jnp.square(z), axis=(1, 2, 3))
  nll = prior + 0.5 * d * math.log(2.0 * math.pi) - logdet
  return {"nll": nll, "prior": prior, "logdet": logdet, "z": z}


def bits_per_dim(nll: jax.Array, num_dims: int) -> jax.Array:
  """Nats per example -> bits per dimension."""
  return nll / (num_dims * math.log(2.0))


def flow_loss(
  params: Any,
  model: tarflow.TarFlow,
  x: jax.Array,
  y: jax.Array | None,
  rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """TarFlow loss on a batch of latents; jittable.

  Args:
    params: the model's `params` collection.
    model: the `TarFlow` module (its config gives noise_sigma, class_dropout, sizes).
    x: latents `[B, h, w, c]` (already normalised per channel).
    y: labels `[B]` int, or None for an unconditional model.
    rng: key for the noise and the label dropout.

  Returns:
    `(loss, metrics)`: loss in nats per dimension; float32 scalar metrics `loss`, `bpd`, `nll`
    (nats per example), `prior_per_dim` (`0.5 E|z|^2 / D`), `logdet_per_dim`, `z_rms`.
  """
  c = model.config
  rng_noise, rng_drop = jax.random.split(rng)
  x = add_noise(x, c.noise_sigma, rng_noise)
  if y is not None and c.num_classes > 0:
    y = drop_labels(y, rng_drop, c.class_dropout, c.null_class)
  terms = nll_terms(params, model, x, y)
  d = c.num_dims
  nll = jnp.mean(terms["nll"])
  loss = nll / d
  metrics = {
    "loss": loss,
    "bpd": bits_per_dim(nll, d),
    "nll": nll,
    "prior_per_dim": jnp.mean(terms["prior"]) / d,
    "logdet_per_dim": jnp.mean(terms["logdet"]) / d,
    "z_rms": jnp.sqrt(jnp.mean(jnp.square(terms["z"]))),
  }
  return loss, {k: v.astype(jnp.float32) for k, v in metrics.items()}
