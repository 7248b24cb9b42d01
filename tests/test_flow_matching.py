"""Path, time shift, time distributions and the flow-matching loss (closed forms).

Gaussian data `x ~ N(mu, Sigma)` gives everything in closed form. With `a = 1 - t`, `b = t`,
`x_t` is Gaussian with mean `a mu` and covariance `C = a^2 Sigma + b^2 I`, `Cov(v, x_t) = b I -
a Sigma`, so in Sigma's eigenbasis (eigenvalues lam):

  E[v | x_t] = -mu + Q diag((b - a lam) / (a^2 lam + b^2)) Q^T (x_t - a mu)
  Var[v_i | x_t] = (lam + 1) - (b - a lam)^2 / (a^2 lam + b^2) = lam / (a^2 lam + b^2)

(using a + b = 1). The loss at the exact velocity is therefore the irreducible
`E_t[mean_i lam_i / ((1-t)^2 lam_i + t^2)]`, which for uniform t integrates to
`(pi / 2) mean_i sqrt(lam_i)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fae_jax.flow_matching import objective, path

MU = np.array([1.0, -2.0])
SIGMA = np.array([[2.0, 1.2], [1.2, 1.5]])
LAM, Q = np.linalg.eigh(SIGMA)


def gaussian_data(rng: jax.Array, n: int) -> jax.Array:
  z = jax.random.normal(rng, (n, 2), jnp.float32)
  return jnp.asarray(MU, jnp.float32) + z @ jnp.asarray(np.linalg.cholesky(SIGMA).T, jnp.float32)


def exact_velocity(x_t: jax.Array, t: jax.Array, y=None) -> jax.Array:
  """E[v | x_t] for x ~ N(MU, SIGMA); x_t `[B, 2]`, t `[B]`."""
  del y
  a, b = (1.0 - t)[:, None], t[:, None]
  lam, q = jnp.asarray(LAM, jnp.float32), jnp.asarray(Q, jnp.float32)
  mu = jnp.asarray(MU, jnp.float32)
  coef = (b - a * lam) / (a * a * lam + b * b)
  return -mu + (((x_t - a * mu) @ q) * coef) @ q.T


def irreducible_loss(t: np.ndarray) -> np.ndarray:
  """mean_i Var[v_i | x_t] at times t (any shape)."""
  t = np.asarray(t, np.float64)[..., None]
  return np.mean(LAM / ((1.0 - t) ** 2 * LAM + t**2), axis=-1)


def test_interpolate_endpoints_and_velocity():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
  np.testing.assert_array_equal(path.interpolate(x, eps, jnp.zeros(3)), x)
  np.testing.assert_array_equal(path.interpolate(x, eps, jnp.ones(3)), eps)
  # Per-sample t broadcasts over the sample's elements.
  t = jnp.array([0.0, 0.25, 1.0])
  x_t = path.interpolate(x, eps, t)
  np.testing.assert_allclose(x_t[1], 0.75 * x[1] + 0.25 * eps[1], rtol=1e-6)
  # v is d x_t / dt.
  dt = 1e-2
  fd = (path.interpolate(x, eps, t + dt) - path.interpolate(x, eps, t)) / dt
  np.testing.assert_allclose(fd, path.velocity_target(x, eps), atol=1e-4)


def test_shift_time_by_hand():
  t = np.linspace(0.0, 1.0, 101)
  np.testing.assert_array_equal(path.shift_time(t, 1.0), t)
  for s in (1.5, 2.5, 4.0):
    shifted = path.shift_time(t, s)
    assert shifted[0] == 0.0 and shifted[-1] == 1.0
    assert np.all(np.diff(shifted) > 0)
    assert np.all(shifted[1:-1] > t[1:-1])  # s > 1 moves time towards noise
    np.testing.assert_allclose(path.unshift_time(shifted, s), t, atol=1e-12)
  assert path.shift_time(0.5, 2.5) == pytest.approx(1.25 / 1.75)
  assert path.shift_time(0.5, 3.0) == pytest.approx(0.75)
  assert path.shift_time(1.0 / 3.0, 2.0) == pytest.approx(0.5)
  assert path.unshift_time(0.75, 3.0) == pytest.approx(0.5)


@pytest.mark.parametrize("ts", [0.3, 0.4, 0.7, 1.0])
def test_shift_equals_lightningdit_timestep_shift(ts):
  t = np.linspace(0.0, 1.0, 57)
  # Ours in t (1 = noise) with s = 1 / ts equals LightningDiT's in tau = 1 - t.
  np.testing.assert_allclose(
    1.0 - path.shift_time(t, 1.0 / ts), path.lightningdit_shift(1.0 - t, ts), atol=1e-12
  )
  # So the sampling grids are the same points: LightningDiT's ascending tau grid from noise.
  num_steps = 10
  tau_grid = path.lightningdit_shift(np.linspace(0.0, 1.0, num_steps + 1), ts)
  np.testing.assert_allclose(
    np.asarray(path.time_grid(num_steps, 1.0 / ts)), 1.0 - tau_grid, atol=1e-6
  )


def test_resolve_shift():
  assert path.resolve_shift() == 1.0
  assert path.resolve_shift(shift=2.5) == 2.5
  assert path.resolve_shift(timestep_shift=0.4) == pytest.approx(2.5)
  assert path.resolve_shift(timestep_shift=1.0) == 1.0
  with pytest.raises(ValueError, match="Set only one"):
    path.resolve_shift(shift=2.5, timestep_shift=0.4)
  with pytest.raises(ValueError, match="timestep_shift"):
    path.resolve_shift(shift=0.4)
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    path.resolve_shift(timestep_shift=0.0)


def test_time_grid():
  grid = np.asarray(path.time_grid(8))
  np.testing.assert_allclose(grid, np.linspace(1.0, 0.0, 9), atol=1e-7)
  grid = np.asarray(path.time_grid(250, 2.5))
  assert grid.shape == (251,) and grid.dtype == np.float32
  assert grid[0] == 1.0 and grid[-1] == 0.0
  assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(grid, path.shift_time(np.linspace(1.0, 0.0, 251), 2.5), atol=1e-7)
  with pytest.raises(ValueError):
    path.time_grid(0)


def test_train_time_distributions():
  n = 200_000
  rng = jax.random.key(0)
  # Uniform: [0, 1), mean 1/2, var 1/12; 5 standard errors.
  t = np.asarray(path.sample_train_time(rng, (n,)))
  assert t.shape == (n,) and t.min() >= 0.0 and t.max() < 1.0
  assert abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
  assert abs(t.var() - 1 / 12) < 0.002
  # Shifted uniform: E[s t / (1 + (s-1) t)] = s / (s-1) (1 - ln(s) / (s-1)).
  s = 2.5
  t = np.asarray(path.sample_train_time(rng, (n,), shift=s))
  expected = s / (s - 1) * (1 - math.log(s) / (s - 1))
  assert abs(t.mean() - expected) < 5 * t.std() / math.sqrt(n)
  np.testing.assert_allclose(np.mean(path.unshift_time(t, s)), 0.5, atol=5 * math.sqrt(1 / 12 / n))
  # Logit-normal: logit(t) ~ N(mean, std).
  for mean, std in ((0.0, 1.0), (0.5, 0.7)):
    t = np.asarray(path.sample_train_time(rng, (n,), dist="logit_normal", mean=mean, std=std))
    assert t.min() > 0.0 and t.max() < 1.0
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(logit.std() - std) < 0.01
  t = np.asarray(path.sample_train_time(rng, (n,), dist="logit_normal"))
  assert abs(t.mean() - 0.5) < 5 * t.std() / math.sqrt(n)  # symmetric about 1/2
  with pytest.raises(ValueError, match="Unknown time distribution"):
    path.sample_train_time(rng, (4,), dist="beta")


def _mean_exact_loss(time_dist: str, shift: float, num_seeds: int = 16, batch: int = 10_000):
  """Mean and standard error over seeds of the loss at the exact velocity."""

  def one(rng):
    rng_data, rng = jax.random.split(rng)
    x = gaussian_data(rng_data, batch)
    return objective.flow_matching_loss(
      exact_velocity, x, None, rng, time_dist=time_dist, shift=shift
    )[0]

  losses = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), num_seeds)))
  return losses.mean(), losses.std(ddof=1) / math.sqrt(num_seeds)


def test_loss_at_exact_velocity_is_the_irreducible_variance():
  # Uniform time: (pi / 2) mean_i sqrt(lam_i) in closed form.
  expected = math.pi / 2 * np.mean(np.sqrt(LAM))
  t = np.linspace(0, 1, 200_001)
  np.testing.assert_allclose(np.trapezoid(irreducible_loss(t), t), expected, rtol=1e-6)
  mean, se = _mean_exact_loss("uniform", 1.0)
  assert abs(mean - expected) < 5 * se, (mean, expected, se)
  assert se < 0.005 * expected  # the check above is sharp

  # Logit-normal, shifted: E over u ~ N(0, 1) of the irreducible loss at shift(sigmoid(u)),
  # by Gauss-Hermite quadrature.
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  t = path.shift_time(1 / (1 + np.exp(-nodes)), 2.5)
  expected = np.sum(weights * irreducible_loss(t)) / np.sqrt(2 * np.pi)
  mean, se = _mean_exact_loss("logit_normal", 2.5)
  assert abs(mean - expected) < 5 * se, (mean, expected, se)


def test_loss_decreases_to_the_known_minimum():
  """v = exact + c + W x_t, trained by gradient descent from (c, W) != 0, reaches the minimum."""
  batch = 4096

  def velocity(params, x_t, t, y):
    return exact_velocity(x_t, t) + params["c"] + x_t @ params["w"]

  def loss_fn(params, rng):
    rng_data, rng = jax.random.split(rng)
    x = gaussian_data(rng_data, batch)
    return objective.flow_matching_loss(
      lambda x_t, t, y: velocity(params, x_t, t, y), x, None, rng
    )[0]

  opt = optax.sgd(0.1)
  params = {"c": jnp.array([0.5, -0.3]), "w": jnp.array([[0.2, 0.1], [0.0, -0.2]])}

  @jax.jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for i in range(150):
    params, opt_state, loss = step(params, opt_state, jax.random.key(100 + i))
    losses.append(float(loss))
  minimum = math.pi / 2 * np.mean(np.sqrt(LAM))
  assert losses[0] > minimum + 0.2
  # Per-batch loss noise is ~1.5% of the minimum at this batch; the tail is at the minimum.
  assert abs(np.mean(losses[-50:]) - minimum) < 0.02 * minimum, (np.mean(losses[-50:]), minimum)
  np.testing.assert_allclose(params["c"], 0.0, atol=0.02)
  np.testing.assert_allclose(params["w"], 0.0, atol=0.02)


def test_loss_excess_is_the_squared_error_to_the_conditional_mean():
  """Bias-variance: adding a constant delta to E[v | x_t] adds |delta|^2 / d to the loss."""
  batch = 200_000
  rng_data, rng = jax.random.split(jax.random.key(3))
  x = gaussian_data(rng_data, batch)
  delta = jnp.array([0.3, -0.4])
  base = objective.flow_matching_loss(exact_velocity, x, None, rng)[0]
  shifted = objective.flow_matching_loss(
    lambda x_t, t, y: exact_velocity(x_t, t) + delta, x, None, rng
  )[0]
  # Excess = mean over samples of (|delta|^2 + 2 delta . r) / d, r = E[v | x_t] - v, d = 2.
  # |delta|^2 / d = 0.125; the cross term has mean 0 and standard error
  # <= |delta| sqrt(max Var[r_i]) / sqrt(batch) = 0.5 * sqrt(lam_max + 1) / 447 ~ 0.0023.
  np.testing.assert_allclose(float(shifted - base), 0.125, atol=0.01)


def test_cosine_loss():
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(size=(3, 4, 4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 4, 4, 8)), jnp.float32)
  for cos_over in ("channels", "sample"):
    np.testing.assert_allclose(objective.cosine_loss(v, v, cos_over), 0.0, atol=1e-6)
    np.testing.assert_allclose(objective.cosine_loss(v, 3.0 * v, cos_over), 0.0, atol=1e-6)
    np.testing.assert_allclose(objective.cosine_loss(v, -v, cos_over), 2.0, atol=1e-6)
  e0, e1 = jnp.zeros((1, 5)).at[0, 0].set(1.0), jnp.zeros((1, 5)).at[0, 1].set(2.0)
  np.testing.assert_allclose(objective.cosine_loss(e0, e1), 1.0, atol=1e-7)

  # LightningDiT's term: mean_flat(1 - cosine_similarity(out, ut, dim=1)) on NCHW.
  torch = pytest.importorskip("torch")
  ref = 1 - torch.nn.functional.cosine_similarity(
    torch.from_numpy(np.array(v).transpose(0, 3, 1, 2)),
    torch.from_numpy(np.array(w).transpose(0, 3, 1, 2)),
    dim=1,
  )
  np.testing.assert_allclose(
    objective.cosine_loss(v, w, "channels"), ref.mean(dim=(1, 2)).numpy(), rtol=1e-5
  )
  with pytest.raises(ValueError, match="cos_over"):
    objective.cosine_loss(v, w, "tokens")


def test_loss_composition_and_time_buckets():
  """x = 0 makes v = eps and x_t = t eps; predicting x_t leaves error (1 - t) eps."""
  batch, dim = 4096, 256
  x = jnp.zeros((batch, dim))
  loss, metrics = objective.flow_matching_loss(
    lambda x_t, t, y: x_t, x, None, jax.random.key(0), cos_weight=0.5
  )
  np.testing.assert_allclose(loss, metrics["mse"] + 0.5 * metrics["cos_loss"], rtol=1e-6)
  # v_pred = t v: cosine 1 except where t = 0 -> cos_loss ~ 0.
  assert float(metrics["cos_loss"]) < 1e-5
  # Bucket [lo, hi) of uniform t: E[(1 - t)^2] = ((1-lo)^3 - (1-hi)^3) / (3 (hi - lo)).
  # Each bucket holds ~1024 samples; a sample's mse (1-t)^2 mean(eps^2) has sd < 0.15 (spread of
  # (1-t)^2 in the bucket, and sd(mean of 256 eps^2) = 0.09), so 0.02 is > 4 standard errors.
  for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
    expected = ((1 - lo) ** 3 - (1 - hi) ** 3) / (3 * (hi - lo))
    np.testing.assert_allclose(metrics[f"mse_t{lo:.2f}-{hi:.2f}"], expected, atol=0.02)
  np.testing.assert_allclose(metrics["mse"], 1 / 3, atol=0.02)
  np.testing.assert_allclose(metrics["t_mean"], 0.5, atol=0.02)
  np.testing.assert_allclose(metrics["target_rms"], 1.0, atol=0.01)
  with pytest.raises(ValueError, match="must match"):
    objective.flow_matching_loss(lambda x_t, t, y: x_t[:, :3], x, None, jax.random.key(0))


def test_loss_is_sharding_invariant():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  x = gaussian_data(jax.random.key(5), 64)
  x = jnp.broadcast_to(x[:, None, None, :], (64, 4, 4, 2))

  def loss_fn(x, rng):
    return objective.flow_matching_loss(
      lambda x_t, t, y: 0.5 * x_t, x, None, rng, time_dist="logit_normal", shift=2.5, cos_weight=1.0
    )

  rng = jax.random.key(7)
  ref_loss, ref_metrics = jax.jit(loss_fn)(x, rng)
  loss, metrics = jax.jit(loss_fn, in_shardings=(sharding, None))(jax.device_put(x, sharding), rng)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for k, v in ref_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_cosine_term_gradient_is_finite_at_a_zero_prediction():
  # A zero-initialised generator predicts exactly 0 at the first step.
  target = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))
  grad = jax.grad(lambda v: objective.cosine_loss(v, target).mean())(jnp.zeros_like(target))
  assert bool(jnp.isfinite(grad).all())
