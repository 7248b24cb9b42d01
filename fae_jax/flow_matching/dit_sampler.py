"""The DiT as a generator: a jitted, batch-sharded `(rng, labels) -> normalised latents`.

Binds a trained `fae_jax.models.dit.Dit` and its weights to `fae_jax.flow_matching.sampler`;
the sampler itself sees only the velocity function. Weights are placed replicated once and
enter the jitted call as an argument (never as closure constants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fae_jax import sharding
from fae_jax.flow_matching import sampler
from fae_jax.models import dit as dit_model

SampleFn = Callable[[jax.Array, jax.Array], jax.Array]


def make_sample_fn(
  model: dit_model.Dit, params: Any, *, shift: float, setting: dict[str, Any], mesh: Mesh
) -> SampleFn:
  """`(rng, labels [B]) -> latents [B, h, w, c]` from noise at t = 1, batch-sharded on `mesh`.

  `setting` holds the sampler's `method`, `num_steps`, guidance `bands` and `diffusion_coeff`
  (`fae_jax.flow_matching.sampler.sample`); `shift` is the time shift the DiT was trained with.
  """
  null = model.config.null_class
  shape = (model.config.input_size, model.config.input_size, model.config.in_channels)

  def fn(params, rng, labels):
    k_noise, k_sde = jax.random.split(rng)
    x1 = jax.random.normal(k_noise, (labels.shape[0], *shape), jnp.float32)

    def velocity(x, t, y):
      return model.apply({"params": params}, x, t, y, train=False)

    return sampler.sample(
      velocity,
      x1,
      labels,
      method=setting["method"],
      num_steps=setting["num_steps"],
      shift=shift,
      guidance_bands=setting["bands"],
      null_label=null,
      rng=k_sde,
      diffusion_coeff=setting["diffusion_coeff"],
    )

  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  jitted = jax.jit(fn, in_shardings=(rep, rep, batch), out_shardings=batch)
  params = jax.device_put(params, rep)
  return lambda rng, labels: jitted(params, rng, labels)
