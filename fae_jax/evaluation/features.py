"""Reconstruction metrics in feature space (per-token cosine similarity, relative MSE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-12


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis: `[..., D], [..., D] -> [...]`, float32.

  Zero vectors get similarity 0 rather than NaN.
  """
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  dot = jnp.sum(x * y, axis=-1)
  norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
  return dot / jnp.maximum(norms, _EPS)


def relative_mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """`||y - x||^2 / ||x||^2` summed over all elements; `x` is the reference. Scalar float32."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  return jnp.sum(jnp.square(y - x)) / jnp.maximum(jnp.sum(jnp.square(x)), _EPS)
