"""The flow-matching training objective for any velocity network.

The network is any `velocity_fn(x_t, t, y) -> v` with `x_t: [B, ...]`, `t: [B]` (float32 in
[0, 1], t = 1 is noise) and labels `y: [B]` (or None); it knows nothing of the path, and the
path (`fae_jax.flow_matching.path`) knows nothing of the network.

Loss (LightningDiT's, which the paper trains with):

  mse = mean over every element of (v_pred - v)^2,       v = eps - x
  cos = mean over samples and positions of 1 - cos(v_pred, v) over the channel axis (last)
  loss = mse + cos_weight * cos

LightningDiT computes the cosine per spatial position across channels (`cosine_similarity(...,
dim=1)` on NCHW) and adds it with weight 1 (`use_cosine_loss: true`); `cos_weight=1.0` with
the default `cos_over='channels'` reproduces that. `cos_over='sample'` takes one cosine per
flattened sample instead. The loss mean over all elements makes the minimum loss independent
of the latent size: for Gaussian data it is the average conditional variance of v given x_t
(see tests/test_flow_matching.py for the closed form).

Metrics (float32 scalars): `loss`, `mse`, `cos_loss`, `t_mean`, `pred_rms`, `target_rms`, and
the mse of the samples whose t falls in each of `num_time_buckets` equal bins of [0, 1]
(`mse_t0.00-0.25`, ... in shifted time, the t the network sees), which shows where the model
is weak. A bucket with no sample in the batch reports 0; with uniform time and batch >= 64 that
has probability < 1e-7 per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fae_jax.flow_matching import path

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

COS_OVER = ("channels", "sample")


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1, eps: float = 1e-8) -> jax.Array:
  """`a . b / (max(|a|, eps) max(|b|, eps))` along `axis` (torch's `cosine_similarity`).

  The norms are `sqrt(max(|a|^2, eps^2))`, so the gradient stays finite at `a = 0` (a zero-init
  network's output), where the gradient of `|a|` itself is 0/0.
  """
  dot = jnp.sum(a * b, axis=axis)
  norm_a = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis), eps * eps))
  norm_b = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=axis), eps * eps))
  return dot / (norm_a * norm_b)


def cosine_loss(v_pred: jax.Array, v_target: jax.Array, cos_over: str = "channels") -> jax.Array:
  """Per-sample `1 - cos(v_pred, v_target)`, `[B]`.

  Args:
    v_pred, v_target: `[B, ...]`; the channel axis is the last one (NHWC latents, `[B, N, C]`
      tokens).
    cos_over: 'channels' (one cosine per position over the last axis, averaged over positions;
      LightningDiT) or 'sample' (one cosine of the flattened sample).
  """
  batch = v_pred.shape[0]
  if cos_over == "channels":
    per_position = 1.0 - cosine_similarity(v_pred, v_target, axis=-1)
    return jnp.mean(per_position.reshape(batch, -1), axis=1)
  if cos_over == "sample":
    return 1.0 - cosine_similarity(v_pred.reshape(batch, -1), v_target.reshape(batch, -1))
  raise ValueError(f"Unknown cos_over {cos_over!r}; expected one of {COS_OVER}.")


def flow_matching_loss(
  velocity_fn: VelocityFn,
  x: jax.Array,
  y: Any,
  rng: jax.Array,
  *,
  time_dist: str = "uniform",
  shift: float = 1.0,
  mean: float = 0.0,
  std: float = 1.0,
  cos_weight: float = 0.0,
  cos_over: str = "channels",
  num_time_buckets: int = 4,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Flow-matching loss of a velocity network on a batch of clean latents.

  Args:
    velocity_fn: `(x_t [B, ...], t [B], y) -> v [B, ...]`.
    x: clean data `[B, ...]` (e.g. normalised latents `[B, h, w, c]`); computed in float32.
    y: conditioning passed through to `velocity_fn` (class labels `[B]`, or None).
    rng: PRNG key; split into the time and noise keys.
    time_dist: 'uniform' or 'logit_normal' (see `path.sample_train_time`).
    shift: time shift `s >= 1` applied to the drawn times.
    mean, std: logit-normal parameters.
    cos_weight: weight of the cosine term (LightningDiT: 1.0).
    cos_over: 'channels' or 'sample' (see `cosine_loss`).
    num_time_buckets: number of equal t bins for the per-bucket mse metrics.

  Returns:
    `(loss, metrics)`; `loss` is a float32 scalar, metrics as in the module docstring.
  """
  if num_time_buckets < 1:
    raise ValueError(f"num_time_buckets must be >= 1, got {num_time_buckets}.")
  x = x.astype(jnp.float32)
  batch = x.shape[0]
  rng_t, rng_eps = jax.random.split(rng)
  t = path.sample_train_time(rng_t, (batch,), dist=time_dist, shift=shift, mean=mean, std=std)
  eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
  x_t = path.interpolate(x, eps, t)
  v_target = path.velocity_target(x, eps)
  v_pred = velocity_fn(x_t, t, y)
  if v_pred.shape != x.shape:
    raise ValueError(
      f"velocity_fn returned shape {v_pred.shape}; it must match the input x_t {x.shape}."
    )
  v_pred = v_pred.astype(jnp.float32)

  sq = jnp.square(v_pred - v_target).reshape(batch, -1)
  mse_per_sample = jnp.mean(sq, axis=1)
  mse = jnp.mean(mse_per_sample)
  cos = jnp.mean(cosine_loss(v_pred, v_target, cos_over))
  loss = mse + cos_weight * cos

  metrics = {
    "loss": loss,
    "mse": mse,
    "cos_loss": cos,
    "t_mean": jnp.mean(t),
    "pred_rms": jnp.sqrt(jnp.mean(jnp.square(v_pred))),
    "target_rms": jnp.sqrt(jnp.mean(jnp.square(v_target))),
  }
  bucket = jnp.clip(jnp.floor(t * num_time_buckets).astype(jnp.int32), 0, num_time_buckets - 1)
  for k in range(num_time_buckets):
    in_bucket = (bucket == k).astype(jnp.float32)
    count = jnp.sum(in_bucket)
    bucket_mse = jnp.sum(mse_per_sample * in_bucket) / jnp.maximum(count, 1.0)
    lo, hi = k / num_time_buckets, (k + 1) / num_time_buckets
    metrics[f"mse_t{lo:.2f}-{hi:.2f}"] = bucket_mse
  return loss, metrics
