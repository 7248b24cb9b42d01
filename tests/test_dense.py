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


@pytest.mark.parametrize(
  "shape,dtype,mask_kind",
  [
    ((2, 9, 3, 8), jnp.float32, None),
    ((2, 9, 3, 8), jnp.float32, "causal"),
    ((2, 9, 3, 8), jnp.float32, "bool"),
    ((2, 7, 2, 16), jnp.bfloat16, "causal"),
  ],
)
def test_attention_matches_jax_dot_product_attention(shape, dtype, mask_kind):
  """`layers.dot_product_attention` (heads-first, additive mask) gives the numbers and the
  gradients of `jax.nn.dot_product_attention`; a fully masked row gives the same output (the
  mean of the values). Its gradient is the one documented difference: jax's `where` sends none
  to that query, the additive bias does; no model here has a query that sees no key."""
  q, k, v = (jax.random.normal(jax.random.key(i), shape, dtype) for i in range(3))
  kw = {}
  if mask_kind == "causal":
    kw["is_causal"] = True
  elif mask_kind == "bool":
    mask = jax.random.bernoulli(jax.random.key(5), 0.6, (shape[0], 1, shape[1], shape[1]))
    kw["mask"] = mask.at[0, 0, 2].set(False)  # one query sees no key at all
  out = layers.dot_product_attention(q, k, v, **kw)
  ref = jax.nn.dot_product_attention(q, k, v, **kw)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol)

  if mask_kind == "bool":
    kw["mask"] = kw["mask"] | jnp.eye(shape[1], dtype=bool)  # every query sees a key

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kw).astype(jnp.float32)))

  g = jax.grad(loss(layers.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5 * tol)


def test_gelu_exact_matches_jax_and_torch_erf_gelu():
  """The erf form of `layers.gelu_exact`: jax's erfc form and PyTorch's `nn.GELU()` (values and
  derivatives), and the input's dtype kept."""
  x = jnp.linspace(-12.0, 12.0, 200_001, dtype=jnp.float32)
  ref = jax.nn.gelu(x, approximate=False)
  np.testing.assert_allclose(layers.gelu_exact(x), ref, rtol=1e-6, atol=1e-6)
  d_ours = jax.vmap(jax.grad(layers.gelu_exact))(x)
  d_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(d_ours, d_ref, rtol=1e-6, atol=1e-6)
  # Not the tanh approximation: that one differs by up to ~5e-4 on this range.
  assert float(jnp.max(jnp.abs(ref - jax.nn.gelu(x, approximate=True)))) > 1e-4
  assert layers.gelu_exact(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  torch = pytest.importorskip("torch")
  t = torch.from_numpy(np.array(x)).requires_grad_(True)
  y = torch.nn.GELU()(t)
  y.sum().backward()
  # 1 + erf(x / sqrt 2) cancels in float32 for x near -3.5 in both: up to ~1e-6 apart there.
  np.testing.assert_allclose(layers.gelu_exact(x), y.detach().numpy(), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(d_ours, t.grad.numpy(), rtol=1e-6, atol=2e-6)
