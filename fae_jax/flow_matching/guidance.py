"""Classifier-free guidance with a piecewise-constant schedule over time.

A schedule is a sequence of bands `(t_low, t_high, scale)` in OUR time (t = 1 is noise, t = 0
is data). At a time t inside a band the velocity is

  v = v_uncond + scale * (v_cond - v_uncond)  =  v_cond + (scale - 1) * (v_cond - v_uncond)

(computed in the second form, so scale 1 gives v_cond bit-exactly); outside every band the
scale is 1 and v = v_cond, and the unconditional network pass is skipped. Guidance acts on ALL
channels of the velocity. DiT, SiT and LightningDiT (`forward_with_cfg`) guide only the first
3 channels "for exact reproducibility" of the original 4-channel SD-VAE DiT numbers; on a
32-channel FAE latent that would leave 29 channels unguided. We do not copy that bug.

Band edges: a band covers `t_low < t <= t_high` (closed on its noisy end), and a band with
`t_low == 0` also covers t = 0. Adjacent bands that share an edge therefore partition the time
axis with no gap and no overlap, and an upper edge at 1 includes the first sampling step
(t = 1). Bands must lie in [0, 1] and must not overlap; bands with scale 1 are dropped.

Time direction of the paper's schedules (PAPER.md "Generators"). The paper states its path as
`x_t = (1-t) x + t eps` with t = 1 noise, i.e. OUR convention, so its bands are used as written:
  * ablations: one scale on t in [0, 0.7]: no guidance on the noisiest 30% of the trajectory;
  * main results: 0.9 on [0.9, 1] (slightly below 1 at the very start), an open scale on
    [0.7, 0.9], 2.5 on [0, 0.7].
This reading is the consistent one: guidance is off (ablation) or below 1 (main) at the
highest noise levels, where strong guidance is known to hurt diversity ("Applying guidance in a
limited interval", Kynkaanniemi et al. 2024), and that is also what LightningDiT's own sampler
does. LightningDiT runs in tau = 1 - t (tau = 0 noise) and guides only where
`tau >= cfg_interval_start` (0.125 in its configs), i.e. our t <= 1 - cfg_interval_start; so
its interval is our band `(0, 1 - cfg_interval_start, scale)` (`lightningdit_interval`). Had
the paper's numbers been in tau, its ablation would guide only the noisiest 70% and never the
last 30%, the opposite of that sampler. The conversion from a tau-band `[a, b]` to ours is
`[1 - b, 1 - a]`; the shift does not enter, because bands are compared with the (shifted) t
the network is evaluated at, as LightningDiT compares its shifted tau.

Why `lax.cond` on a scalar t: every sample of a sampling step shares t, so whether a step is
guided is one scalar predicate, and `lax.cond` runs only the taken branch (one network pass
outside the bands, two inside). Under `vmap` over t a cond becomes a select that evaluates both
branches, so the samplers never vmap over time. The conditional and unconditional passes are
two calls on the same batch rather than one call on a concatenated 2B batch: with the batch
sharded over devices a concatenation would move half of each device's rows elsewhere, while
two calls keep every row on its device; the FLOPs are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
Band = tuple[float, float, float]

# LightningDiT's default guidance interval start (tau = 1 - t), for reference.
LIGHTNINGDIT_CFG_INTERVAL_START = 0.125


def paper_ablation(scale: float) -> tuple[Band, ...]:
  """The paper's ablation schedule: `scale` on t in [0, 0.7], none above (t = 1 is noise)."""
  return ((0.0, 0.7, float(scale)),)


def paper_main(mid_scale: float) -> tuple[Band, ...]:
  """The paper's main-results schedule: 0.9 on [0.9, 1], `mid_scale` on [0.7, 0.9] (the paper
  does not give it), 2.5 on [0, 0.7]."""
  return ((0.9, 1.0, 0.9), (0.7, 0.9, float(mid_scale)), (0.0, 0.7, 2.5))


def lightningdit_interval(
  scale: float, cfg_interval_start: float = LIGHTNINGDIT_CFG_INTERVAL_START
) -> tuple[Band, ...]:
  """LightningDiT's `cfg_scale` with `cfg_interval=True` as a band in our time.

  It guides where its `tau >= cfg_interval_start` (tau = 1 - t), i.e. t <= 1 - start.
  """
  return ((0.0, 1.0 - float(cfg_interval_start), float(scale)),)


def normalize_bands(bands: Sequence[Sequence[float]]) -> tuple[Band, ...]:
  """Validates a schedule and returns it sorted by `t_low`, with scale-1 bands dropped.

  Raises:
    ValueError: a band is malformed, outside [0, 1], empty, or overlaps another.
  """
  out = []
  for band in bands:
    if len(band) != 3:
      raise ValueError(f"Guidance band {band!r} must be (t_low, t_high, scale).")
    lo, hi, scale = (float(v) for v in band)
    if not (0.0 <= lo < hi <= 1.0):
      raise ValueError(
        f"Guidance band {band!r} needs 0 <= t_low < t_high <= 1 (t = 1 is noise, t = 0 data)."
      )
    if not math.isfinite(scale):
      raise ValueError(f"Guidance band {band!r} has a non-finite scale.")
    out.append((lo, hi, scale))
  out.sort()
  for (lo_a, hi_a, _), (lo_b, hi_b, _) in zip(out[:-1], out[1:]):
    if lo_b < hi_a:
      raise ValueError(
        f"Guidance bands ({lo_a}, {hi_a}) and ({lo_b}, {hi_b}) overlap; bands cover "
        "t_low < t <= t_high and may share an edge but not more."
      )
  return tuple(b for b in out if b[2] != 1.0)


def guidance_scale(t: jax.Array, bands: Sequence[Band]) -> tuple[jax.Array, jax.Array]:
  """`(guided, scale)` at time(s) t: whether t is in a band (bool) and the scale (1 outside).

  `bands` must be normalised (`normalize_bands`), so at most one band matches.
  """
  t = jnp.asarray(t, jnp.float32)
  guided = jnp.zeros(t.shape, bool)
  scale = jnp.ones(t.shape, jnp.float32)
  for lo, hi, s in bands:
    inside = (t <= hi) & ((t > lo) | (lo == 0.0))
    guided = guided | inside
    scale = jnp.where(inside, s, scale)
  return guided, scale


def guided_velocity(
  velocity_fn: VelocityFn,
  x: jax.Array,
  t: jax.Array,
  y: Any,
  null_label: int | None,
  bands: Sequence[Sequence[float]],
) -> jax.Array:
  """Velocity with classifier-free guidance at one time shared by the batch.

  Args:
    velocity_fn: `(x [B, ...], t [B], y) -> v [B, ...]`.
    x: state `[B, ...]`.
    t: scalar time (0-d); all samples of a sampling step share it.
    y: class labels `[B]` (int), or None for an unconditional model (then `bands` must be
      empty after dropping scale-1 bands).
    null_label: the label of the unconditional ("dropped") class, e.g. `num_classes`.
    bands: guidance schedule, see the module docstring.

  Returns:
    `v [B, ...]`: `v_cond` outside every band (one network pass), guided inside (two passes).
  """
  bands = normalize_bands(bands)
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 0:
    raise ValueError(
      f"guided_velocity takes one scalar t shared by the batch, got shape {t.shape}; the "
      "guidance decision is one lax.cond per step."
    )
  t_batch = jnp.full((x.shape[0],), t, jnp.float32)
  v_cond = velocity_fn(x, t_batch, y)
  if not bands:
    return v_cond
  if y is None or null_label is None:
    raise ValueError(
      "Guidance bands were given but y or null_label is None; guidance needs class labels and "
      "the null label of the unconditional class."
    )
  guided, scale = guidance_scale(t, bands)
  y_null = jnp.full_like(y, null_label)

  def with_guidance(v_c: jax.Array) -> jax.Array:
    v_u = velocity_fn(x, t_batch, y_null).astype(v_c.dtype)
    return v_c + (scale - 1.0).astype(v_c.dtype) * (v_c - v_u)

  return jax.lax.cond(guided, with_guidance, lambda v_c: v_c, v_cond)
