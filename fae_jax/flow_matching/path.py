"""The linear (rectified-flow) path, its time shift and the time distributions.

Conventions (DESIGN.md "Flow matching time"; every module and test relies on them):

  * t = 0 is data, t = 1 is noise: `x_t = (1 - t) x + t eps`, `eps ~ N(0, I)`.
  * The regression target is the path's velocity `v = d x_t / dt = eps - x`.
  * Time shift `s >= 1` maps `t -> s t / (1 + (s - 1) t)` (SD3 / RAE style). It fixes both ends,
    is monotone, and moves the middle towards noise: s = 2.5 maps 0.5 to 0.714, so more
    training samples and sampling steps land at high noise, where the wide latents of FAE
    still carry global structure.
  * The paper and LightningDiT write the shift as `timestep_shift = ts` in LightningDiT's own
    time `tau = 1 - t` (tau = 0 is noise), mapping `tau -> ts tau / (1 + (ts - 1) tau)`. Both
    are the same map: `1 - shift_time(t, s) == lightningdit_shift(1 - t, 1 / s)`, so
    `s = 1 / ts` (the paper's ts = 0.4 is s = 2.5). `resolve_shift` accepts either spelling.
  * Training times are drawn uniform or logit-normal on [0, 1] and then shifted; the sampling
    grid (`time_grid`) is the uniform grid from 1 to 0, shifted the same way.

LightningDiT itself shifts only its sampling grid and trains on unshifted logit-normal times;
whether training times are shifted too is the caller's choice (`shift=1.0` disables it).

Everything here is plain arithmetic, so it works on numpy arrays, jax arrays and Python floats,
inside or outside `jit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def _expand_time(t: Any, x: Any) -> Any:
  """Reshapes per-sample times `[B]` to broadcast against `x: [B, ...]`; scalars pass through."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim))


def interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """`x_t = (1 - t) x + t eps`.

  Args:
    x: data `[B, ...]`.
    eps: noise, same shape as `x`.
    t: times `[B]` (or a scalar shared by the batch).

  Returns:
    `x_t`, shape of `x`.
  """
  t = _expand_time(t, x)
  return (1.0 - t) * x + t * eps


def velocity_target(x: jax.Array, eps: jax.Array) -> jax.Array:
  """The path velocity `d x_t / dt = eps - x` (independent of t for the linear path)."""
  return eps - x


def shift_time(t: Any, s: float) -> Any:
  """Time shift `t -> s t / (1 + (s - 1) t)`; s = 1 is the identity, s > 1 moves t to noise.

  Works elementwise on floats, numpy and jax arrays. `t = 0` and `t = 1` are fixed exactly.
  """
  return s * t / (1.0 + (s - 1.0) * t)


def unshift_time(t: Any, s: float) -> Any:
  """Inverse of `shift_time`: `t -> t / (s - (s - 1) t)` (the shift by `1 / s`)."""
  return t / (s - (s - 1.0) * t)


def lightningdit_shift(tau: Any, ts: float) -> Any:
  """LightningDiT's sampling-grid shift in its own time `tau = 1 - t` (tau = 0 is noise).

  `tau -> ts tau / (1 + (ts - 1) tau)`, with `timestep_shift = ts` in (0, 1]. Kept only to pin
  the equivalence with `shift_time` in tests: `1 - shift_time(t, 1 / ts) ==
  lightningdit_shift(1 - t, ts)`.
  """
  return ts * tau / (1.0 + (ts - 1.0) * tau)


def resolve_shift(shift: float | None = None, timestep_shift: float | None = None) -> float:
  """The shift `s` from a config that sets `shift` (ours) or `timestep_shift` (LightningDiT's).

  Args:
    shift: `s >= 1` in our t = 1-is-noise convention, or None.
    timestep_shift: LightningDiT's `ts` in (0, 1], `s = 1 / ts`, or None.

  Returns:
    `s` (1.0 when neither is set).

  Raises:
    ValueError: both are set, or a value is out of range.
  """
  if shift is not None and timestep_shift is not None:
    raise ValueError(
      f"Both shift={shift} and timestep_shift={timestep_shift} are set; they are two spellings "
      "of one setting (shift = 1 / timestep_shift). Set only one of them."
    )
  if timestep_shift is not None:
    ts = float(timestep_shift)
    if not 0.0 < ts <= 1.0:
      raise ValueError(
        f"timestep_shift={ts} must be in (0, 1] (LightningDiT's convention, shift = 1 / "
        "timestep_shift; the paper uses 0.4). For no shift set shift=1.0 (LightningDiT's "
        "timestep_shift=0 means 'off')."
      )
    return 1.0 / ts
  if shift is None:
    return 1.0
  s = float(shift)
  if not (math.isfinite(s) and s >= 1.0):
    raise ValueError(
      f"shift={s} must be >= 1 (t = 1 is noise; s > 1 spends more time at high noise). A "
      "LightningDiT-style value below 1 belongs in timestep_shift instead."
    )
  return s


def sample_train_time(
  rng: jax.Array,
  shape: Sequence[int],
  *,
  dist: str = "uniform",
  shift: float = 1.0,
  mean: float = 0.0,
  std: float = 1.0,
) -> jax.Array:
  """Training times in [0, 1]: `uniform` or `logit_normal` (sigmoid of N(mean, std)), shifted.

  Args:
    rng: PRNG key.
    shape: output shape, usually `(B,)`.
    dist: 'uniform' or 'logit_normal'.
    shift: time shift `s` applied after drawing (1.0: none).
    mean, std: logit-normal parameters (ignored for 'uniform'); LightningDiT uses (0, 1).

  Returns:
    float32 times of `shape`.
  """
  shape = tuple(shape)
  if dist == "uniform":
    t = jax.random.uniform(rng, shape, jnp.float32)
  elif dist == "logit_normal":
    if std <= 0:
      raise ValueError(f"logit_normal time distribution needs std > 0, got {std}.")
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, jnp.float32))
  else:
    raise ValueError(f"Unknown time distribution {dist!r}; expected one of {TIME_DISTRIBUTIONS}.")
  return shift_time(t, shift)


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
  """The sampling grid `[num_steps + 1]` from t = 1 (noise) down to t = 0 (data), shifted.

  Computed in float64 on the host (it depends only on static arguments) and returned as a
  float32 array whose first entry is exactly 1 and last exactly 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
  grid = shift_time(np.linspace(1.0, 0.0, num_steps + 1), float(shift))
  grid[0], grid[-1] = 1.0, 0.0
  return jnp.asarray(grid, jnp.float32)
