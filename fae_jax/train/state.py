"""The training state shared by every stage, its construction in its shardings, and the EMA update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from fae_jax import sharding as sharding_lib


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


def _make_init_fn(
  init_params_fn: Callable[[jax.Array], Any], tx: optax.GradientTransformation, use_ema: bool
) -> Callable[[jax.Array, jax.Array], TrainState]:
  def init(init_rng, train_rng):
    params = init_params_fn(init_rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      # A distinct array, so donating the state never donates one buffer twice.
      ema_params=jax.tree.map(lambda p: p + jnp.zeros_like(p), params) if use_ema else None,
      rng=train_rng,
    )

  return init


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  init_key, train_key = jax.random.split(jax.random.key(seed))
  return init_key, raw_key(train_key)


def abstract_train_state(
  *,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  init_params_fn: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  seed: int = 0,
) -> tuple[TrainState, TrainState]:
  """`(abstract_state, shardings)`: shapes from `jax.eval_shape`, shardings from the config."""
  init = _make_init_fn(init_params_fn, tx, float(config.get("ema_decay", 0.0)) > 0)
  abstract = jax.eval_shape(init, *_seed_keys(seed))
  param_sh = sharding_lib.param_shardings(
    abstract.params,
    mesh,
    tuple(config.get("fsdp_rules", (".*",))),
    int(config.get("fsdp_min_size", 2**14)),
  )
  replicated = sharding_lib.replicated(mesh)
  shardings = TrainState(
    step=replicated,
    params=param_sh,
    opt_state=sharding_lib.opt_state_shardings(abstract.opt_state, abstract.params, param_sh, mesh),
    ema_params=param_sh if abstract.ema_params is not None else None,
    rng=replicated,
  )
  return abstract, shardings


def create_train_state(
  *,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  init_params_fn: Callable[[jax.Array], Any],
  tx: optax.GradientTransformation,
  seed: int = 0,
  init_params: Any = None,
  step_key: jax.Array | None = None,
) -> tuple[TrainState, TrainState]:
  """`(state, shardings)`: the initial state built directly in its shardings by a jitted init.

  With `init_params` (a pytree shaped like `init_params_fn`'s output), the state starts from
  those weights (placed by the shardings, passed to the jit as an argument: nothing is baked into
  the executable) instead of a random init. `step_key` replaces the seed's key of the step keys.
  """
  abstract, shardings = abstract_train_state(
    config=config, mesh=mesh, init_params_fn=init_params_fn, tx=tx, seed=seed
  )
  sharding_lib.log_sharding_table(shardings.params, abstract.params, "Parameter shardings")
  use_ema = abstract.ema_params is not None
  init_key, train_key = _seed_keys(seed)
  if step_key is not None:
    train_key = raw_key(step_key)
  if init_params is None:
    init = _make_init_fn(init_params_fn, tx, use_ema)
    return jax.jit(init, out_shardings=shardings)(init_key, train_key), shardings
  start = _make_init_fn(lambda params: params, tx, use_ema)
  params = jax.device_put(init_params, shardings.params)
  return jax.jit(start, out_shardings=shardings)(params, train_key), shardings
