"""Samplers and guidance against closed forms for Gaussian data.

For `x ~ N(mu, Sigma)` (eigen-decomposition `Sigma = Q diag(lam) Q^T`) and the path
`x_t = (1-t) x + t eps`, with `a = 1 - t`, `b = t`:

  * `x_t ~ N(a mu, C_t)`, `C_t = a^2 Sigma + b^2 I`, and the exact velocity is affine,
      `v(x, t) = E[eps - x | x_t = x] = -mu + A_t (x - a mu)`,
      `A_t = (b I - a Sigma) C_t^{-1} = Q diag((b - a lam) / (a^2 lam + b^2)) Q^T`;
  * `A_t = 1/2 d/dt log C_t` (eigenwise), so the ODE flow map from t = 1 to t = 0 is
      `x_0 = mu + Sigma^{1/2} x_1` (symmetric square root): linear, known exactly.

A class-conditional mixture (classes k with means mu_k, shared Sigma, equal priors) has
per-class velocities as above and the unconditional velocity `sum_k w_k(x) v_k(x)` with
`w_k` the posterior class probabilities under `N(a mu_k, C_t)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fae_jax.flow_matching import guidance, path, sampler


class Gaussian:
  """Closed forms for data `N(mu, sigma)` on the linear path."""

  def __init__(self, mu, sigma):
    self.mu = np.asarray(mu, np.float64)
    self.sigma = np.asarray(sigma, np.float64)
    self.lam, self.q = np.linalg.eigh(self.sigma)
    self.sqrt_sigma = self.q @ np.diag(np.sqrt(self.lam)) @ self.q.T

  def velocity(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """Exact `E[v | x_t = x]`; x `[B, d]`, t `[B]`."""
    a, b = (1.0 - t)[:, None], t[:, None]
    lam, q = jnp.asarray(self.lam, jnp.float32), jnp.asarray(self.q, jnp.float32)
    mu = jnp.asarray(self.mu, jnp.float32)
    coef = (b - a * lam) / (a * a * lam + b * b)
    return -mu + (((x - a * mu) @ q) * coef) @ q.T

  def log_density_t(self, x: jax.Array, t: jax.Array) -> jax.Array:
    """log N(x; a mu, C_t) up to a constant shared by Gaussians with the same sigma."""
    a, b = (1.0 - t)[:, None], t[:, None]
    lam, q = jnp.asarray(self.lam, jnp.float32), jnp.asarray(self.q, jnp.float32)
    y = (x - a * jnp.asarray(self.mu, jnp.float32)) @ q
    return -0.5 * jnp.sum(y * y / (a * a * lam + b * b), axis=-1)

  def flow_map(self, x1: np.ndarray) -> np.ndarray:
    """The exact ODE map from t = 1 to t = 0."""
    return self.mu + np.asarray(x1, np.float64) @ self.sqrt_sigma

  def affine_velocity(self, t: float) -> tuple[np.ndarray, np.ndarray]:
    """`(A, beta)` with `v(x, t) = A x + beta` (float64, column-vector convention)."""
    a, b = 1.0 - t, t
    big_a = self.q @ np.diag((b - a * self.lam) / (a * a * self.lam + b * b)) @ self.q.T
    return big_a, -self.mu - a * big_a @ self.mu


GAUSS = Gaussian([1.0, -2.0], [[2.0, 1.2], [1.2, 1.5]])


def gaussian_velocity_fn(x, t, y):
  del y
  return GAUSS.velocity(x, t)


def noise(n: int, d: int = 2, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (n, d), jnp.float32)


def run(method: str, x1: jax.Array, num_steps: int, **kwargs) -> np.ndarray:
  fn = jax.jit(
    lambda x1, rng: sampler.sample(
      gaussian_velocity_fn, x1, method=method, num_steps=num_steps, rng=rng, **kwargs
    )
  )
  return np.asarray(fn(x1, jax.random.key(11)), np.float64)


def assert_moments(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray, extra: float = 0.0):
  """Sample mean and covariance match (mean, cov) within 5 standard errors (+ `extra`).

  Standard errors for n Gaussian samples: sqrt(cov_ii / n) for the mean and
  sqrt((cov_ii cov_jj + cov_ij^2) / n) for the covariance entries.
  """
  n = samples.shape[0]
  mean_tol = 5 * np.sqrt(np.diag(cov) / n) + extra
  cov_tol = 5 * np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n) + extra
  assert np.all(np.abs(samples.mean(0) - mean) < mean_tol), (samples.mean(0), mean, mean_tol)
  assert np.all(np.abs(np.cov(samples.T) - cov) < cov_tol), (np.cov(samples.T), cov, cov_tol)


# ------------------------------------------------------------------------------------- ODE


# Steps per method and the measured discretisation error at them (shift 1 / 2.5): RMS deviation
# from the exact map ~0.0073 / 0.0076 (Euler, 250 steps, the paper's count) and ~1.0e-4 /
# 3.6e-4 (Heun, 64 steps); largest deviation of a covariance entry ~0.022 and ~0.0011. The
# bounds leave ~1.4x room.
ODE_SETTINGS = {"euler": (250, 0.01, 0.03), "heun": (64, 5e-4, 2e-3)}


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_ode_reproduces_the_gaussian(method, shift):
  num_steps, rms_bound, moment_bound = ODE_SETTINGS[method]
  x1 = noise(20_000)
  out = run(method, x1, num_steps, shift=shift)
  exact = GAUSS.flow_map(x1)
  assert np.sqrt(np.mean((out - exact) ** 2)) < rms_bound
  # Against the exact map on the same noise (no sampling error): discretisation only. The mean
  # is preserved exactly (v(a mu, t) = -mu, so every Euler/Heun step keeps m_t = (1-t) mu).
  np.testing.assert_allclose(out.mean(0), exact.mean(0), atol=1e-4)
  np.testing.assert_allclose(np.cov(out.T), np.cov(exact.T), atol=moment_bound)
  # Against the target: 5 standard errors of 20000 samples (mean ~0.05, covariance ~0.1)
  # plus the discretisation bound.
  assert_moments(out, GAUSS.mu, GAUSS.sigma, extra=moment_bound)


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_ode_converges_and_heun_is_second_order(shift):
  x1 = noise(2_000)
  exact = GAUSS.flow_map(x1)

  def error(method, num_steps):
    return np.sqrt(np.mean((run(method, x1, num_steps, shift=shift) - exact) ** 2))

  euler = {n: error("euler", n) for n in (8, 32)}
  heun = {n: error("heun", n) for n in (8, 32)}
  # Same noise, deterministic maps: 4x the steps gives ~4x (order 1) and ~16x (order 2).
  assert euler[8] / euler[32] > 3.0, euler
  assert heun[8] / heun[32] > 10.0, heun
  assert heun[8] < euler[8] and heun[32] < euler[32] / 10


# ------------------------------------------------------------------------------------- SDE


def em_chain_moments(num_steps: int, shift: float, c: float) -> tuple[np.ndarray, np.ndarray]:
  """Exact mean and covariance of the discrete Euler-Maruyama chain (float64).

  The velocity is affine, so each step `x' = M x + k + sigma z` maps Gaussians to Gaussians:
  `m' = M m + k`, `P' = M P M^T + sigma^2 I`, from `(0, I)`. Written from the SDE in the
  sampler's docstring, independently of its code: `x' = x - h (v + c e) + sqrt(2 c t h) z`,
  `e = x + (1 - t) v`; no noise and c = 0 on the last step.
  """
  grid = path.shift_time(np.linspace(1.0, 0.0, num_steps + 1), shift)
  d = GAUSS.mu.shape[0]
  m, cov = np.zeros(d), np.eye(d)
  for i in range(num_steps):
    t, h = grid[i], grid[i] - grid[i + 1]
    ci = c if i < num_steps - 1 else 0.0
    big_a, beta = GAUSS.affine_velocity(t)
    # v = A x + beta, e = (I + (1-t) A) x + (1-t) beta
    big_m = np.eye(d) - h * (big_a + ci * (np.eye(d) + (1 - t) * big_a))
    k = -h * (1 + ci * (1 - t)) * beta
    m = big_m @ m + k
    cov = big_m @ cov @ big_m.T + 2 * ci * t * h * np.eye(d)
  return m, cov


def test_em_chain_converges_to_the_data_distribution():
  """The SDE (not just its discretisation) has the data marginal at t = 0: bias -> 0, order 1."""

  def bias(n, shift=2.5, c=1.0):
    m, cov = em_chain_moments(n, shift, c)
    return max(np.max(np.abs(m - GAUSS.mu)), np.max(np.abs(cov - GAUSS.sigma)))

  # Measured: 0.161, 0.042, 0.0106 at 25, 100, 400 steps (shift 2.5): first order, ~4.2 / N.
  assert bias(400) < 0.015
  assert bias(25) / bias(100) > 3.0 and bias(100) / bias(400) > 3.0
  # c = 0 is the Euler ODE, whose chain covariance converges to sigma as well.
  assert bias(400, c=0.0) < 0.02


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_euler_maruyama_reproduces_the_gaussian(shift):
  num_steps = 200
  out = run("euler_maruyama", noise(20_000), num_steps, shift=shift)
  chain_mean, chain_cov = em_chain_moments(num_steps, shift, 1.0)
  # The samples follow the discrete chain within sampling error ...
  assert_moments(out, chain_mean, chain_cov)
  # ... whose bias at 200 steps is ~0.021 (~4.2 / N, test above), so the data distribution
  # is matched within sampling error plus that bias.
  bias = max(np.max(np.abs(chain_mean - GAUSS.mu)), np.max(np.abs(chain_cov - GAUSS.sigma)))
  assert bias < 0.025
  assert_moments(out, GAUSS.mu, GAUSS.sigma, extra=bias)


def test_euler_maruyama_is_stochastic_and_zero_diffusion_is_euler():
  x1 = noise(256)
  euler = run("euler", x1, 16, shift=2.5)
  em0 = run("euler_maruyama", x1, 16, shift=2.5, diffusion_coeff=0.0)
  np.testing.assert_allclose(em0, euler, atol=1e-6)
  fn = jax.jit(
    lambda rng: sampler.sample(
      gaussian_velocity_fn, x1, method="euler_maruyama", num_steps=16, rng=rng
    )
  )
  a, b = np.asarray(fn(jax.random.key(1))), np.asarray(fn(jax.random.key(2)))
  assert np.std(a - b) > 0.1
  np.testing.assert_array_equal(a, np.asarray(fn(jax.random.key(1))))
  with pytest.raises(ValueError, match="rng"):
    sampler.sample(gaussian_velocity_fn, x1, method="euler_maruyama", num_steps=4)
  with pytest.raises(ValueError, match="Unknown sampling method"):
    sampler.sample(gaussian_velocity_fn, x1, method="rk4", num_steps=4)


# -------------------------------------------------------------------------------- guidance

DIM = 4
CLASS_MEANS = np.array([[1.0, -1.0, 0.5, 2.0], [-1.0, 0.5, -1.5, 0.0]])  # differ in every channel
CLASS_COV = np.diag([0.5, 1.0, 0.3, 0.8]) + 0.1
CLASSES = [Gaussian(m, CLASS_COV) for m in CLASS_MEANS]
NULL = 2


def mixture_velocities(x, t):
  """(v_class0, v_class1, v_unconditional) for equal class priors."""
  v = [g.velocity(x, t) for g in CLASSES]
  logits = jnp.stack([g.log_density_t(x, t) for g in CLASSES], axis=-1)
  w = jax.nn.softmax(logits, axis=-1)
  return v[0], v[1], w[:, :1] * v[0] + w[:, 1:] * v[1]


def class_velocity_fn(x, t, y):
  v0, v1, v_uncond = mixture_velocities(x, t)
  y = y[:, None]
  return jnp.where(y == NULL, v_uncond, jnp.where(y == 0, v0, v1))


def test_guided_velocity_closed_form_on_all_channels():
  x = noise(512, DIM, seed=3) * 1.5
  y = jnp.arange(512) % 2
  t = jnp.float32(0.4)
  v0, v1, v_uncond = (np.asarray(v) for v in mixture_velocities(x, jnp.full((512,), t)))
  v_cond = np.where(np.asarray(y)[:, None] == 0, v0, v1)

  # Scale 1 is the conditional velocity exactly (band dropped; no second pass).
  out = guidance.guided_velocity(class_velocity_fn, x, t, y, NULL, [(0.0, 1.0, 1.0)])
  np.testing.assert_array_equal(out, v_cond)

  scales = (0.5, 2.5, 6.0)
  outs = jax.jit(
    lambda x, t, y: [
      guidance.guided_velocity(class_velocity_fn, x, t, y, NULL, [(0.0, 1.0, s)]) for s in scales
    ]
  )(x, t, y)
  for scale, out in zip(scales, outs):
    out = np.asarray(out)
    np.testing.assert_allclose(out, v_uncond + scale * (v_cond - v_uncond), rtol=1e-5, atol=1e-5)
    # Every channel moves: the guidance term is visible on each of the DIM channels.
    moved = np.mean(np.abs(out - v_cond), axis=0)
    assert moved.shape == (DIM,) and np.all(moved > 0.05), moved


def test_guidance_bands_edges():
  bands = guidance.normalize_bands(guidance.paper_main(1.7))
  cases = {1.0: 0.9, 0.95: 0.9, 0.9: 1.7, 0.8: 1.7, 0.7: 2.5, 0.3: 2.5, 0.0: 2.5}
  for t, expected in cases.items():
    guided, scale = guidance.guidance_scale(jnp.float32(t), bands)
    assert bool(guided) and float(scale) == pytest.approx(expected), t
  ablation = guidance.normalize_bands(guidance.paper_ablation(3.0))
  for t, expected in {1.0: False, 0.71: False, 0.7: True, 0.2: True, 0.0: True}.items():
    guided, scale = guidance.guidance_scale(jnp.float32(t), ablation)
    assert bool(guided) == expected and float(scale) == (3.0 if expected else 1.0), t
  # LightningDiT's interval start 0.125 in tau = 1 - t is the band (0, 0.875].
  assert guidance.lightningdit_interval(6.7) == ((0.0, 0.875, 6.7),)
  assert guidance.normalize_bands([(0.0, 0.5, 1.0), (0.5, 1.0, 2.0)]) == ((0.5, 1.0, 2.0),)
  with pytest.raises(ValueError, match="overlap"):
    guidance.normalize_bands([(0.0, 0.6, 2.0), (0.5, 1.0, 2.0)])
  with pytest.raises(ValueError, match="t_low < t_high"):
    guidance.normalize_bands([(0.7, 0.2, 2.0)])


def test_guidance_outside_bands_skips_the_unconditional_pass():
  x = noise(64, DIM, seed=4)
  y = jnp.arange(64) % 2
  bands = guidance.paper_ablation(4.0)

  def nan_uncond_fn(x, t, y):
    v = class_velocity_fn(x, t, y)
    return jnp.where((y == NULL)[:, None], jnp.nan, v)

  fn = jax.jit(lambda x, t, y: guidance.guided_velocity(nan_uncond_fn, x, t, y, NULL, bands))
  cond_fn = jax.jit(class_velocity_fn)
  for t in (1.0, 0.9, 0.71):
    out = np.asarray(fn(x, jnp.float32(t), y))
    assert np.all(np.isfinite(out))
    expected = np.asarray(cond_fn(x, jnp.full((64,), t), y))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  for t in (0.7, 0.3):
    assert np.all(np.isnan(np.asarray(fn(x, jnp.float32(t), y))))  # inside: the pass runs

  # Count unconditional passes in a jitted sampler run: 8 Euler steps evaluate t = 1, 0.875,
  # ..., 0.125, of which 0.625, 0.5, 0.375, 0.25, 0.125 lie in (0, 0.7].
  calls = []

  def counting_fn(x, t, y):
    jax.debug.callback(lambda is_null: calls.append(bool(is_null)), jnp.all(y == NULL))
    return class_velocity_fn(x, t, y)

  out = jax.jit(
    lambda x1: sampler.sample(
      counting_fn, x1, y, num_steps=8, guidance_bands=bands, null_label=NULL
    )
  )(x)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(calls) == 8 + 5 and sum(calls) == 5, calls


def test_guided_sampling_pushes_every_channel_away_from_the_other_class():
  x1 = noise(4_000, DIM, seed=5)
  y = jnp.ones((4_000,), jnp.int32)

  def draw(bands):
    fn = jax.jit(
      lambda x1: sampler.sample(
        class_velocity_fn, x1, y, method="heun", num_steps=16, guidance_bands=bands, null_label=NULL
      )
    )
    return np.asarray(fn(x1), np.float64)

  plain = draw(())
  assert_moments(plain, CLASS_MEANS[1], CLASSES[1].sigma, extra=1e-3)
  guided = draw(guidance.paper_ablation(3.0))
  # Same noise: guidance moves the class-1 mean away from class 0 on EVERY channel.
  direction = CLASS_MEANS[1] - CLASS_MEANS[0]
  push = (guided.mean(0) - plain.mean(0)) * np.sign(direction)
  assert np.all(push > 0.05), push


# -------------------------------------------------------------------- compilation, sharding


def test_one_program_independent_of_num_steps():
  traces = []

  def counting_fn(x, t, y):
    traces.append(1)
    return gaussian_velocity_fn(x, t, y)

  x1 = noise(8)
  for method, per_step in (("euler", 1), ("heun", 2), ("euler_maruyama", 1)):
    sizes = []
    for num_steps in (4, 64):
      traces.clear()
      jaxpr = jax.make_jaxpr(
        lambda x1, m=method, n=num_steps: sampler.sample(
          counting_fn, x1, method=m, num_steps=n, rng=jax.random.key(0)
        )
      )(x1)
      # The network is traced once per pass of the loop body, not once per step.
      assert len(traces) == per_step, (method, num_steps, len(traces))
      assert [e.primitive.name for e in jaxpr.eqns if e.primitive.name in ("scan", "while")]
      sizes.append(len(jaxpr.eqns))
    assert sizes[0] == sizes[1], (method, sizes)


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_sampler_is_sharding_invariant(method):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, P("data"))
  x1 = noise(64, DIM, seed=6)
  y = jnp.arange(64) % 2
  kwargs = dict(
    method=method, num_steps=6, shift=2.5, guidance_bands=guidance.paper_main(2.0), null_label=NULL
  )

  def fn(x1, y, rng):
    return sampler.sample(class_velocity_fn, x1, y, rng=rng, **kwargs)

  rng = jax.random.key(9)
  ref = jax.jit(fn)(x1, y, rng)
  sharded = jax.jit(
    fn, in_shardings=(batch_sharding, batch_sharding, None), out_shardings=batch_sharding
  )(jax.device_put(x1, batch_sharding), jax.device_put(y, batch_sharding), rng)
  assert sharded.sharding.is_equivalent_to(batch_sharding, 2)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(ref), rtol=1e-5, atol=1e-5)
  assert math.isfinite(float(jnp.sum(sharded)))
