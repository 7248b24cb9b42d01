"""End-to-end TarFlow on a toy class-conditional Gaussian mixture of 2x2x2 latents.

Training must lower bits/dim from the standard normal's towards the data's true conditional
entropy (and never below it: a too-good likelihood means a wrong log-determinant), beat the
best single Gaussian, and guided samples must land on the component of their label.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fae_jax.models import tarflow as tf
from fae_jax.tarflow import objective, sampler

NUM_CLASSES = 4
COMPONENT_STD = 0.3
NOISE_SIGMA = 0.05
MEANS = np.random.default_rng(0).choice([-1.5, 1.5], size=(NUM_CLASSES, 2, 2, 2))


def _draw(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  y = rng.integers(0, NUM_CLASSES, n)
  x = MEANS[y] + COMPONENT_STD * rng.standard_normal((n, 2, 2, 2))
  return x.astype(np.float32), y.astype(np.int32)


def _fast_jit(fn):
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def test_training_lowers_bits_per_dim_and_samples_follow_labels():
  c = tf.TarFlowConfig(
    input_size=2,
    in_channels=2,
    width=32,
    deep_depth=2,
    shallow_depth=1,
    num_shallow=1,
    num_heads=2,
    num_classes=NUM_CLASSES,
    class_dropout=0.1,
    noise_sigma=NOISE_SIGMA,
  )
  model = tf.TarFlow(c)
  x0 = np.zeros((1, 2, 2, 2), np.float32)
  params = _fast_jit(model.init)(jax.random.key(0), x0, np.zeros((1,), np.int32))["params"]
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @_fast_jit
  def step(params, opt_state, x, y, key):
    (_, metrics), grads = jax.value_and_grad(objective.flow_loss, has_aux=True)(
      params, model, x, y, key
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  x_eval, y_eval = _draw(1024, np.random.default_rng(1))
  eval_bpd = _fast_jit(
    lambda p: objective.flow_loss(p, model, x_eval, y_eval, jax.random.key(9))[1]["bpd"]
  )
  bpd_init = float(eval_bpd(params))
  data_rng = np.random.default_rng(2)
  for i in range(300):
    x, y = _draw(128, data_rng)
    params, opt_state, metrics = step(params, opt_state, x, y, jax.random.key(i))
  assert np.isfinite(float(metrics["loss"]))
  bpd_final = float(eval_bpd(params))

  d = c.num_dims
  to_bits = 1.0 / (d * math.log(2))
  # The noise-augmented data: per class N(mean_k, (0.3^2 + 0.05^2) I).
  entropy_bpd = 0.5 * d * math.log(2 * math.pi * math.e * (COMPONENT_STD**2 + NOISE_SIGMA**2))
  entropy_bpd *= to_bits
  flat = x_eval.reshape(len(x_eval), -1)
  cov = np.cov(flat.T) + NOISE_SIGMA**2 * np.eye(d)
  gaussian_bpd = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * cov)[1] * to_bits
  # Identity init: the standard normal's bits/dim of data with E x^2 ~ 2.3.
  assert bpd_init > 2.5
  assert entropy_bpd - 0.1 < bpd_final < 0.5 * (entropy_bpd + gaussian_bpd), (
    bpd_init,
    bpd_final,
    entropy_bpd,
    gaussian_bpd,
  )

  labels = jnp.arange(64) % NUM_CLASSES
  sample_fn = _fast_jit(lambda p, k, y: sampler.sample(p, model, k, y, guidance=2.0))
  samples = sample_fn(params, jax.random.key(5), labels)
  dist = ((np.asarray(samples)[:, None] - MEANS[None]) ** 2).sum(axis=(2, 3, 4))
  assert np.mean(dist.argmin(axis=1) == np.asarray(labels)) >= 0.9
