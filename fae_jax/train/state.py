"""The training state shared by every stage, and its EMA update."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; checkpointed whole.

  Attributes:
    step: int32 scalar, the number of completed optimizer steps (the step about to run).
    params: float32 parameter pytree.
    opt_state: optax state; its moment trees carry the parameters' shardings.
    ema_params: exponential moving average of `params`, or None when `ema_decay` is 0.
    rng: raw uint32 key data (`jax.random.key_data` form, so Orbax stores it as an array). The
      step's key is `fold_in(rng, step)`: it depends only on the seed and the step, so a resumed
      run draws the same randomness as an uninterrupted one.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array

  def step_rng(self) -> jax.Array:
    return jax.random.fold_in(self.rng, self.step)

  def final_params(self) -> Any:
    """The weights to evaluate and export: the EMA when the run keeps one, else `params`."""
    return self.ema_params if self.ema_params is not None else self.params

  @property
  def final_weights(self) -> str:
    """What `final_params` holds, as exports record it: 'ema' or 'raw'."""
    return "ema" if self.ema_params is not None else "raw"


def raw_key(key: jax.Array | int) -> jax.Array:
  """Raw uint32 key data from a seed, a typed key or raw key data."""
  if isinstance(key, int):
    key = jax.random.key(key)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return key


def ema_decay_at(step: jax.Array, decay: float, warmup: bool = False) -> jax.Array:
  """The decay used for the update after `step` completed steps.

  With `warmup`, `min(decay, (1 + step) / (10 + step))` (TensorFlow's `num_updates` rule): the
  average follows the fast-moving early parameters instead of remembering the initialisation
  for ~1 / (1 - decay) steps.
  """
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params: Any, params: Any, decay: jax.Array) -> Any:
  """`ema = decay * ema + (1 - decay) * params`, leaf by leaf, in the EMA's dtype."""
  return jax.tree.map(
    lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
    ema_params,
    params,
  )
