"""Sampling from a TarFlow: invert the flow token by token, then one score-based denoising step.

```
z ~ N(0, I)  --TarFlow.inverse(temperature * z, y, guidance)-->  x~ (a noise-augmented latent)
x = x~ + sigma^2 * grad_x log p(x~ | y)                          (optional, sigma = noise_sigma)
```

The flow models the latents plus Gaussian noise of std sigma (`objective.add_noise`), so its
samples are noisy. By Tweedie's formula `E[x | x~] = x~ + sigma^2 grad log p_sigma(x~)`, and the
flow is an exact density of `p_sigma`, so one gradient of its own log-likelihood (`jax.grad`,
no extra network) denoises the sample: TarFlow's / STARFlow's "self-denoising" step. The score
is the conditional model's (label y, guidance 1).

Inversion (see `models/tarflow.py`): each block decodes its tokens in order inside
`nn.while_loop` with static-shape per-layer KV caches (`cache=True`, O(T) layer passes of one
token), or recomputes the full causal pass per token (`cache=False`, the reference the tests
compare against). Everything is jittable and batch-parallel, so under `jax.jit` a batch sharded
over the mesh (`fae_jax.sharding.batch_sharding`) samples without any collective.

Guidance is STARFlow's rule on the deep block (`tarflow.guide_affine`); scale 1 or None is the
conditional model without an unconditional pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from fae_jax import sharding as sharding_lib
from fae_jax.models import tarflow


def inverse(
  params: Any,
  model: tarflow.TarFlow,
  z: jax.Array,
  y: jax.Array | None = None,
  *,
  cache: bool = True,
  guidance: Any = None,
  temperature: float | jax.Array = 1.0,
) -> jax.Array:
  """`x = flow^-1(temperature * z)`, `[B, h, w, c]`; KV-cached decoding by default."""
  return model.apply(
    {"params": params},
    z,
    y,
    method=tarflow.TarFlow.inverse,
    cache=cache,
    guidance=guidance,
    temperature=temperature,
  )


def inverse_reference(
  params: Any,
  model: tarflow.TarFlow,
  z: jax.Array,
  y: jax.Array | None = None,
  *,
  guidance: Any = None,
  temperature: float | jax.Array = 1.0,
) -> jax.Array:
  """The recompute-from-scratch inverse (no cache): the reference for `inverse`."""
  return inverse(params, model, z, y, cache=False, guidance=guidance, temperature=temperature)


def log_prob(
  params: Any, model: tarflow.TarFlow, x: jax.Array, y: jax.Array | None = None
) -> jax.Array:
  """Exact `log p(x | y)` in nats, `[B]`."""
  return model.apply({"params": params}, x, y, method=tarflow.TarFlow.log_prob)


def score(
  params: Any, model: tarflow.TarFlow, x: jax.Array, y: jax.Array | None = None
) -> jax.Array:
  """`grad_x log p(x | y)`, `[B, h, w, c]` (examples are independent, so the gradient of the
  batch sum is the per-example score)."""
  return jax.grad(lambda v: jnp.sum(log_prob(params, model, v, y)))(x)


def denoise(
  params: Any,
  model: tarflow.TarFlow,
  x: jax.Array,
  y: jax.Array | None = None,
  *,
  sigma: float | None = None,
) -> jax.Array:
  """One-step score denoising `x + sigma^2 * grad_x log p(x | y)`; sigma defaults to the
  training `noise_sigma`."""
  sigma = model.config.noise_sigma if sigma is None else sigma
  x = x.astype(model.config.out_dtype)
  return x + sigma**2 * score(params, model, x, y)


def sample_from_noise(
  params: Any,
  model: tarflow.TarFlow,
  z: jax.Array,
  y: jax.Array | None = None,
  *,
  temperature: float | jax.Array = 1.0,
  guidance: Any = None,
  cache: bool = True,
  denoise_step: bool = True,
) -> jax.Array:
  """Inverse of base noise `z [B, h, w, c]`, then (optionally) the denoising step."""
  x = inverse(params, model, z, y, cache=cache, guidance=guidance, temperature=temperature)
  if denoise_step and model.config.noise_sigma > 0:
    x = denoise(params, model, x, y)
  return x


def sample(
  params: Any,
  model: tarflow.TarFlow,
  rng: jax.Array,
  y: jax.Array | None = None,
  *,
  batch_size: int | None = None,
  temperature: float | jax.Array = 1.0,
  guidance: Any = None,
  cache: bool = True,
  denoise_step: bool = True,
) -> jax.Array:
  """Samples latents `[B, h, w, c]` (float32; float64 for a float64 model).

  Args:
    params: the model's `params` collection.
    model: the `TarFlow` module.
    rng: key for the base noise.
    y: `[B]` labels (None: unconditional, needs `batch_size`).
    batch_size: B when y is None.
    temperature: std of the base noise.
    guidance: deep-block guidance scale (None / 1 = conditional only).
    cache: KV-cached decoding (True) or the recompute reference (False).
    denoise_step: apply the score-based denoising step with `sigma = noise_sigma`.
  """
  if y is None and batch_size is None:
    raise ValueError("tarflow.sampler.sample: pass labels `y` or a `batch_size`.")
  z = base_noise(model.config, rng, batch_size if y is None else y.shape[0])
  return sample_from_noise(
    params,
    model,
    z,
    y,
    temperature=temperature,
    guidance=guidance,
    cache=cache,
    denoise_step=denoise_step,
  )


def base_noise(config: tarflow.TarFlowConfig, rng: jax.Array, batch_size: int) -> jax.Array:
  """`z ~ N(0, I)`, `[B, h, w, c]` in the model's out dtype."""
  shape = (batch_size, config.input_size, config.input_size, config.in_channels)
  return jax.random.normal(rng, shape, config.out_dtype)


def make_sample_fn(
  model: tarflow.TarFlow,
  *,
  mesh: Mesh | None = None,
  temperature: float = 1.0,
  guidance: float | None = None,
  cache: bool = True,
  denoise_step: bool = True,
  compiler_options: dict[str, Any] | None = None,
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """A jitted `fn(params, rng, y) -> x [B, h, w, c]` (same numbers as `sample`).

  With a mesh, the labels, the base noise and the samples are sharded over the batch axes; the
  parameters keep the sharding they come with. Sampling settings are static (a new guidance or
  temperature compiles a new function). `compiler_options` go to `jax.jit` (XLA flags).
  """
  batch = None if mesh is None else sharding_lib.batch_sharding(mesh)

  def constrain(a):
    return a if batch is None else jax.lax.with_sharding_constraint(a, batch)

  def fn(params, rng, y):
    y = constrain(y)
    z = constrain(base_noise(model.config, rng, y.shape[0]))
    return sample_from_noise(
      params,
      model,
      z,
      y,
      temperature=temperature,
      guidance=guidance,
      cache=cache,
      denoise_step=denoise_step,
    )

  return jax.jit(fn, out_shardings=batch, compiler_options=compiler_options)
