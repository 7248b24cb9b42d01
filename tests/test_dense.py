"""`layers.Dense` is `flax.linen.Dense` with the matmul on a 2-D view: same parameters, same
outputs, same gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax.models import layers


@pytest.mark.parametrize(
  "shape,dtype,use_bias",
  [
    ((2, 5, 7, 12), None, True),
    ((3, 12), None, False),
    ((4, 6, 12), jnp.bfloat16, True),
  ],
)
def test_dense_matches_flax_dense(shape, dtype, use_bias):
  kw = dict(features=9, use_bias=use_bias, dtype=dtype, bias_init=nn.initializers.normal(0.1))
  ours, ref = layers.Dense(**kw), nn.Dense(**kw)
  x = jax.random.normal(jax.random.key(1), shape)
  p = ours.init(jax.random.key(0), x)
  p_ref = ref.init(jax.random.key(0), x)
  # Same parameter tree, shapes, dtypes and values from the same key.
  assert jax.tree.structure(p) == jax.tree.structure(p_ref)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  y, y_ref = ours.apply(p, x), ref.apply(p, x)
  assert y.shape == y_ref.shape == (*shape[:-1], 9) and y.dtype == y_ref.dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol)

  def loss(m):
    return lambda prm, x: jnp.sum(jnp.sin(m.apply(prm, x).astype(jnp.float32)))

  g = jax.grad(loss(ours), argnums=(0, 1))(p, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(p, x)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5 * tol, rtol=tol
    )
