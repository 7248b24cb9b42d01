"""AdamW with a warmup + cosine/constant learning-rate schedule, gradient clipping and a
weight-decay mask, built from the stage's train `ConfigDict`.

Config fields (defaults in `fae_jax.train.loop.default_train_config`):
  lr: peak learning rate.
  schedule: 'cosine' (linear warmup, then half-cosine to `lr * end_lr_factor` at `num_steps`)
    or 'constant' (linear warmup, then `lr`).
  warmup_steps: linear warmup from 0 at step 0 to `lr` at step `warmup_steps`.
  num_steps: total training steps (the end of the cosine).
  end_lr_factor: cosine floor as a fraction of `lr` (default 0).
  b1, b2, eps: Adam moments.
  weight_decay: decoupled (AdamW) decay coefficient; like optax/PyTorch AdamW the decay term is
    multiplied by the scheduled learning rate.
  grad_clip: clip the gradient to this global L2 norm before Adam; 0 turns clipping off.
  wd_mask: regexes (`re.search` on the `a/b/c` parameter path) of the parameters that decay.

Weight-decay rule: a parameter decays iff it has at least 2 dimensions AND its path matches one
of `wd_mask`. The default `(r"(^|/)kernel$",)` decays the weight matrices of Dense/Conv/
DenseGeneral layers (Flax names them `kernel`) and nothing else: biases, norm scales, LayerScale
gammas (1-D) are excluded by the rank test; position embeddings, cls/register/mask tokens and
embedding tables (>= 2-D but not called `kernel`) are excluded by the name test.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

DEFAULT_WD_MASK = (r"(^|/)kernel$",)
SCHEDULES = ("cosine", "constant")

Schedule = Callable[[jax.Array | int], jax.Array]


def _get(config: ml_collections.ConfigDict, name: str, default: Any) -> Any:
  value = config.get(name, default)
  return default if value is None else value


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """Learning rate as a function of the (0-based) step, float32 scalar.

  Warmup: `lr * step / warmup_steps` for `step < warmup_steps` (0 at step 0). Cosine: for
  `warmup_steps <= step <= num_steps`, with `p = (step - warmup) / (num_steps - warmup)`,
  `lr * (f + (1 - f) * 0.5 * (1 + cos(pi * p)))`, `f = end_lr_factor`; constant `lr * f` after.
  """
  lr = float(config.lr)
  kind = _get(config, "schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"train.schedule={kind!r} is not one of {SCHEDULES}.")
  warmup = int(_get(config, "warmup_steps", 0))
  num_steps = int(_get(config, "num_steps", 0))
  floor = float(_get(config, "end_lr_factor", 0.0))
  if kind == "cosine" and num_steps <= warmup:
    raise ValueError(
      f"train.schedule='cosine' needs num_steps ({num_steps}) > warmup_steps ({warmup})."
    )

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == "constant":
      value = jnp.full_like(step, lr)
    else:
      progress = jnp.clip((step - warmup) / (num_steps - warmup), 0.0, 1.0)
      value = lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    if warmup > 0:
      value = jnp.where(step < warmup, lr * step / warmup, value)
    return value

  return schedule


def weight_decay_mask(params: Any, patterns: Sequence[str] = DEFAULT_WD_MASK) -> Any:
  """Pytree of bools like `params`: True where the parameter decays (see the module doc)."""
  compiled = [re.compile(p) for p in patterns]

  def decays(path, leaf) -> bool:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    return len(leaf.shape) >= 2 and any(r.search(name) for r in compiled)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
  config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, Schedule]:
  """AdamW from the config (fields in the module doc).

  Returns:
    `(tx, schedule)`: the optax transformation (clip -> Adam -> masked decay -> -lr scaling) and
    the learning-rate schedule, so the train step can log `train/lr`.
  """
  schedule = make_schedule(config)
  grad_clip = float(_get(config, "grad_clip", 0.0))
  weight_decay = float(_get(config, "weight_decay", 0.0))
  patterns = tuple(_get(config, "wd_mask", DEFAULT_WD_MASK))
  parts = []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(
    optax.scale_by_adam(
      b1=float(_get(config, "b1", 0.9)),
      b2=float(_get(config, "b2", 0.999)),
      eps=float(_get(config, "eps", 1e-8)),
    )
  )
  if weight_decay > 0:
    parts.append(
      optax.add_decayed_weights(weight_decay, mask=lambda p: weight_decay_mask(p, patterns))
    )
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule
