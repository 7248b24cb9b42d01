"""JAX linear probe: accuracy on separable data, chance on random labels, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fae_jax.evaluation import linear_probe

NUM_CLASSES = 5


def _blobs(n, seed, *, dim=32, spread=1.0):
  """Gaussian blobs around fixed class centres (centre seed shared by train and test)."""
  centres = np.random.default_rng(123).normal(size=(NUM_CLASSES, dim)) * 1.5
  rng = np.random.default_rng(seed)
  y = rng.integers(0, NUM_CLASSES, n)
  x = centres[y] + spread * rng.normal(size=(n, dim))
  return x.astype(np.float32), y


def test_pool_tokens_shapes():
  x = np.arange(2 * 6 * 3, dtype=np.float32).reshape(2, 6, 3)
  np.testing.assert_allclose(linear_probe.pool_tokens(x), x.mean(1))
  np.testing.assert_allclose(linear_probe.pool_tokens(x.reshape(2, 2, 3, 3)), x.mean(1))
  np.testing.assert_array_equal(linear_probe.pool_tokens(x[:, 0]), x[:, 0])
  with pytest.raises(ValueError, match="pool_tokens"):
    linear_probe.pool_tokens(np.zeros((2, 2, 2, 2, 2)))


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_separable_blobs_are_learned(method):
  train_x, train_y = _blobs(2000, seed=0)
  test_x, test_y = _blobs(1000, seed=1)
  acc = linear_probe.linear_probe_top1(
    train_x, train_y, test_x, test_y, NUM_CLASSES, method=method, steps=300
  )
  assert acc > 0.95


def test_token_inputs_are_mean_pooled():
  """`[B, N, D]` tokens give the same probe as their mean-pooled `[B, D]` features."""
  x, y = _blobs(500, seed=2)
  noise = np.random.default_rng(3).normal(size=(500, 4, 32)).astype(np.float32)
  tokens = x[:, None] + noise - noise.mean(1, keepdims=True)
  pooled = np.asarray(jnp.mean(jnp.asarray(tokens), axis=1))
  # The pooled tokens are `x` up to float rounding (~1e-7)...
  np.testing.assert_allclose(pooled, x, atol=1e-5)
  a = linear_probe.train_linear_probe(tokens, y, NUM_CLASSES, steps=50)
  b = linear_probe.train_linear_probe(pooled, y, NUM_CLASSES, steps=50)
  # ...and the probe on tokens is the probe on their mean: same inputs, same fit. (Comparing with
  # `x` instead lets L-BFGS amplify that rounding by a machine-dependent amount.)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  assert linear_probe.probe_accuracy(a, tokens, y) == linear_probe.probe_accuracy(b, pooled, y)
  c = linear_probe.train_linear_probe(x, y, NUM_CLASSES, steps=50)
  assert linear_probe.probe_accuracy(c, x, y) == pytest.approx(
    linear_probe.probe_accuracy(a, tokens, y), abs=0.01
  )


def test_random_labels_give_chance():
  train_x, _ = _blobs(2000, seed=0)
  test_x, _ = _blobs(2000, seed=1)
  rng = np.random.default_rng(7)
  train_y = rng.integers(0, NUM_CLASSES, 2000)
  test_y = rng.integers(0, NUM_CLASSES, 2000)
  acc = linear_probe.linear_probe_top1(train_x, train_y, test_x, test_y, NUM_CLASSES)
  # Chance is 0.2; its standard error at 2000 test examples is 0.009.
  assert abs(acc - 1.0 / NUM_CLASSES) < 0.05


def test_lbfgs_reaches_the_regularised_optimum():
  x, y = _blobs(1000, seed=4, spread=3.0)
  l2 = 1e-2
  params = linear_probe.train_linear_probe(x, y, NUM_CLASSES, l2=l2, steps=500, tol=1e-6)
  xs = (x - params["mean"]) / params["scale"]
  np.testing.assert_allclose(xs.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(xs.std(0), 1.0, rtol=1e-4)

  def objective(wb):
    logits = xs @ wb["w"] + wb["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y))
    return jnp.mean(ce) + 0.5 * l2 * jnp.sum(jnp.square(wb["w"]))

  grad = jax.grad(objective)({"w": params["w"], "b": params["b"]})
  assert float(optax.tree.norm(grad)) < 1e-4


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_deterministic_given_seed(method):
  x, y = _blobs(600, seed=5, spread=2.0)
  kwargs = {"method": method, "steps": 40, "batch_size": 64}
  a = linear_probe.train_linear_probe(x, y, NUM_CLASSES, seed=3, **kwargs)
  b = linear_probe.train_linear_probe(x, y, NUM_CLASSES, seed=3, **kwargs)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = linear_probe.train_linear_probe(x, y, NUM_CLASSES, seed=4, **kwargs)
  if method == "adam":  # the seed only orders Adam's minibatches
    assert not np.allclose(a["w"], c["w"])
  else:
    np.testing.assert_array_equal(a["w"], c["w"])


def test_errors():
  x, y = _blobs(10, seed=6)
  with pytest.raises(ValueError, match="labels"):
    linear_probe.train_linear_probe(x, y[:5], NUM_CLASSES)
  with pytest.raises(ValueError, match="method"):
    linear_probe.train_linear_probe(x, y, NUM_CLASSES, method="sgd")
