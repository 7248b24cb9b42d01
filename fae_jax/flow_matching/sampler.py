"""Samplers for a velocity network on the linear path: Euler and Heun ODE, Euler-Maruyama SDE.

All integrate from t = 1 (noise `x1 ~ N(0, I)`) to t = 0 (data) over `path.time_grid(num_steps,
shift)`, evaluate the network through `guidance.guided_velocity` (so any guidance schedule
applies, on all channels), and run as one `lax.fori_loop`, so a jitted call is one program
whose size does not grow with `num_steps`. Nothing leaves the device (no host callbacks), all
per-step work is elementwise over the batch, and noise comes from `jax.random` with a key
folded with the step index, so the caller can jit with any batch sharding and get the same
numbers as unsharded. The state is integrated in float32 whatever the dtype of `x1`.

ODE. `dx/dt = v(x, t)`; a step from t to t' < t:
  * euler: `x' = x + (t' - t) v(x, t)`.
  * heun:  predictor `x~ = x + (t' - t) v(x, t)`, corrector `x' = x + (t' - t)/2 (v(x, t) +
    v(x~, t'))`, on every step including the last (t' = 0 is a valid time for a velocity
    network on this path, so there is no singularity to step around). Two passes per step.

SDE (euler_maruyama). Score from velocity: with `x_t = (1-t) x + t eps`, let `e = E[eps | x_t]`
and `d = E[x | x_t]`. Then `x_t = (1-t) d + t e` and `v = E[eps - x | x_t] = e - d`; eliminating d
gives `e = x_t + (1-t) v`, and Tweedie's formula for the Gaussian noise `t eps` gives the score

  score(x_t) = -e / t = -(x_t + (1-t) v) / t.

For any diffusion `g(t)`, the reverse-time SDE `dx = [v - g^2/2 score] dt + g dW` (dt < 0)
has the same marginals as the ODE (its Fokker-Planck equation differs from the ODE's continuity
equation by `g^2/2 (div(p score) - laplacian p) = 0`). We take `g(t)^2 = 2 c t` with
`c = diffusion_coeff`, SiT's `diffusion_form='sigma'` (diffusion proportional to the noise
level t). Then `g^2/2 score = -c e`, and a step from t to t' = t - h is

  x' = x - h (v + c e) + sqrt(2 c t h) z,      z ~ N(0, I),

with no division by t or 1 - t anywhere: the drift stays bounded at both ends and the first
step can start at t = 1. SiT's default `'SBDM'` form, `g^2 = 2t/(1-t)` here, diverges at t = 1
and needs the grid truncated; we do not use it. c = 0 is the Euler ODE exactly.

The last step (to t = 0) is deterministic, a plain Euler step `x' = x - t v`, which for this
path is exactly the posterior mean `E[x_0 | x_t] = x_t - t v(x_t, t)`; noise injected at the
end could never be removed. The SDE uses the same shifted grid as the ODE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fae_jax.flow_matching import guidance, path

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

METHODS = ("euler", "heun", "euler_maruyama")


def sample(
  velocity_fn: VelocityFn,
  x1: jax.Array,
  y: Any = None,
  *,
  method: str = "euler",
  num_steps: int,
  shift: float = 1.0,
  guidance_bands: Sequence[Sequence[float]] = (),
  null_label: int | None = None,
  rng: jax.Array | None = None,
  diffusion_coeff: float = 1.0,
) -> jax.Array:
  """Integrates from noise `x1` at t = 1 to data at t = 0.

  Args:
    velocity_fn: `(x [B, ...], t [B], y) -> v [B, ...]`, v = d x_t / dt (points to noise).
    x1: initial noise `[B, ...]`, N(0, I).
    y: conditioning (class labels `[B]`) or None.
    method: 'euler', 'heun' (ODE) or 'euler_maruyama' (SDE).
    num_steps: number of steps (Heun: two network passes per step).
    shift: time shift `s >= 1` of the grid (see `path.time_grid`).
    guidance_bands: guidance schedule `(t_low, t_high, scale)`; () for none.
    null_label: label of the unconditional class (needed with guidance).
    rng: PRNG key, required by 'euler_maruyama'; step i uses `fold_in(rng, i)`, so pass a key
      not used for anything else (e.g. not the parent of `x1`'s key: `fold_in(k, 1)` equals
      `split(k)[1]`).
    diffusion_coeff: `c` in `g(t)^2 = 2 c t` for 'euler_maruyama'.

  Returns:
    samples at t = 0, float32, shape of `x1`.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; expected one of {METHODS}.")
  if method == "euler_maruyama":
    if rng is None:
      raise ValueError("method='euler_maruyama' needs rng for its noise.")
    if diffusion_coeff < 0:
      raise ValueError(f"diffusion_coeff must be >= 0, got {diffusion_coeff}.")
  bands = guidance.normalize_bands(guidance_bands)
  grid = path.time_grid(num_steps, shift)
  x = x1.astype(jnp.float32)

  def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
    return guidance.guided_velocity(velocity_fn, x, t, y, null_label, bands).astype(jnp.float32)

  def euler_step(i: jax.Array, x: jax.Array) -> jax.Array:
    t, t_next = grid[i], grid[i + 1]
    return x + (t_next - t) * velocity(x, t)

  def heun_step(i: jax.Array, x: jax.Array) -> jax.Array:
    t, t_next = grid[i], grid[i + 1]
    v = velocity(x, t)
    x_pred = x + (t_next - t) * v
    v_next = velocity(x_pred, t_next)
    return x + (t_next - t) * 0.5 * (v + v_next)

  def euler_maruyama_step(i: jax.Array, x: jax.Array) -> jax.Array:
    t, t_next = grid[i], grid[i + 1]
    h = t - t_next
    # c = 0 on the last step turns it into the deterministic posterior-mean step.
    c = jnp.where(i < num_steps - 1, jnp.float32(diffusion_coeff), jnp.float32(0.0))
    v = velocity(x, t)
    eps_hat = x + (1.0 - t) * v
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    return x - h * (v + c * eps_hat) + jnp.sqrt(2.0 * c * t * h) * z

  step = {"euler": euler_step, "heun": heun_step, "euler_maruyama": euler_maruyama_step}[method]
  return jax.lax.fori_loop(0, num_steps, step, x)
