"""Pixel decoder: patch layout, shapes, parameter count, feature noise, mixed precision."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax.models import layers
from fae_jax.models import pixel_decoder as pd


def _tokens(shape=(2, 6, 12), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _tiny(**overrides) -> pd.PixelDecoderConfig:
  fields = dict(
    feature_dim=12, grid=(2, 3), width=32, depth=2, num_heads=4, patch_size=4, channels=3
  )
  fields.update(overrides)
  return pd.PixelDecoderConfig(**fields)


@pytest.mark.parametrize(
  "p, c, grid", [(1, 3, (2, 3)), (2, 1, (3, 2)), (4, 3, (2, 5)), (14, 3, (1, 2)), (3, 4, (1, 1))]
)
def test_patchify_unpatchify_round_trip(p, c, grid):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, grid[0] * p, grid[1] * p, c)).astype(np.float32)
  tokens = layers.patchify(jnp.asarray(images), p)
  assert tokens.shape == (2, grid[0] * grid[1], p * p * c)
  np.testing.assert_array_equal(np.asarray(layers.unpatchify(tokens, p, grid, c)), images)
  t = rng.normal(size=tokens.shape).astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(layers.patchify(layers.unpatchify(jnp.asarray(t), p, grid, c), p)), t
  )
  # Layout: token i * w + j is the (i, j) patch, flattened in (py, px, c) order.
  i, j = grid[0] - 1, grid[1] - 1
  patch = images[1, i * p : (i + 1) * p, j * p : (j + 1) * p, :].reshape(-1)
  np.testing.assert_array_equal(np.asarray(tokens[1, i * grid[1] + j]), patch)


def test_patchify_rejects_bad_shapes():
  with pytest.raises(ValueError, match="not divisible by patch size 4"):
    layers.patchify(jnp.zeros((1, 6, 8, 3)), 4)
  with pytest.raises(ValueError, match=r"expects tokens \[B, 6, 48\]"):
    layers.unpatchify(jnp.zeros((1, 6, 47)), 4, (2, 3), 3)


@pytest.mark.parametrize(
  "overrides",
  [{}, {"rope": True, "ffn": "swiglu", "norm": "rmsnorm", "pos": "none"}],
)
def test_decoder_output_shape(overrides):
  config = _tiny(**overrides)
  model = pd.PixelDecoder(config)
  tokens = _tokens()
  params = jax.jit(model.init)(jax.random.key(1), tokens)
  out = jax.jit(model.apply)(params, tokens)
  assert out.shape == (2, 8, 12, 3) and out.dtype == jnp.float32
  assert config.image_size == (8, 12)
  assert np.all(np.isfinite(np.asarray(out)))
  assert ("pos_embed" in params["params"]) == (config.pos == "learned")
  assert params["params"]["head"]["kernel"].shape == (32, 48)
  with pytest.raises(ValueError, match=r"expects tokens \[B, 6, 12\]"):
    model.apply(params, tokens[:, :5])


def test_vit_l_parameter_count_and_config_round_trip():
  config = pd.PixelDecoderConfig.from_variant("L/16", feature_dim=1536, grid=(16, 16))
  assert config == pd.PixelDecoderConfig()  # the defaults are the paper's ImageNet model
  assert config.image_size == (256, 256)
  shapes = jax.eval_shape(
    pd.PixelDecoder(config).init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 256, 1536), jnp.float32),
  )
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  assert count == 304_934_656  # paper: 305.36M (see the module docstring)
  assert abs(count / 305.36e6 - 1) < 0.002
  again = pd.PixelDecoderConfig.from_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config
  with pytest.raises(ValueError, match="Unknown pixel decoder variant"):
    pd.PixelDecoderConfig.from_variant("XXL/16")
  with pytest.raises(ValueError, match="Unknown PixelDecoderConfig keys"):
    pd.PixelDecoderConfig.from_dict({"widht": 3})
  small = pd.PixelDecoderConfig.from_variant("S/14", feature_dim=384, grid=(8, 8))
  assert (small.width, small.depth, small.num_heads, small.image_size) == (384, 12, 6, (112, 112))


def test_flops_count_the_blocks():
  one, two = _tiny(depth=1), _tiny(depth=2)
  n, w = 6, 32
  per_block = 2 * n * w * 4 * w + 4 * n * n * w + 2 * 2 * n * w * 4 * w
  f1 = pd.pixel_decoder_flops_per_example(one)
  assert pd.pixel_decoder_flops_per_example(two) - f1 == per_block
  assert pd.pixel_decoder_flops_per_example(one, training=True) == 3 * f1


def test_noise_only_in_training():
  x = _tokens((4, 6, 8))
  for mode in ("fixed", "uniform", "none"):
    out = pd.add_feature_noise(x, jax.random.key(1), mode=mode, train=False)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  np.testing.assert_array_equal(
    np.asarray(pd.add_feature_noise(x, jax.random.key(1), mode="none", train=True)), np.asarray(x)
  )
  noisy = pd.add_feature_noise(x, jax.random.key(1), mode="fixed", train=True)
  assert noisy.shape == x.shape and noisy.dtype == x.dtype
  assert not np.allclose(np.asarray(noisy), np.asarray(x))
  with pytest.raises(ValueError, match="Unknown feature-noise mode"):
    pd.add_feature_noise(x, jax.random.key(1), mode="gauss", train=True)
  with pytest.raises(ValueError, match="needs an rng"):
    pd.add_feature_noise(x, None, mode="fixed", train=True)


def test_fixed_noise_statistics():
  x = _tokens((64, 64, 32))
  noise = np.asarray(
    pd.add_feature_noise(x, jax.random.key(2), mode="fixed", sigma=0.4, train=True) - x
  )
  assert abs(noise.mean()) < 0.005
  assert abs(noise.std() - 0.4) < 0.005
  per_sample = noise.reshape(64, -1).std(axis=1)
  np.testing.assert_allclose(per_sample, 0.4, atol=0.03)


def test_uniform_noise_statistics():
  tau = 0.8
  x = jnp.zeros((512, 16, 32))
  noise = np.asarray(
    pd.add_feature_noise(x, jax.random.key(3), mode="uniform", tau=tau, train=True)
  )
  per_sample = noise.reshape(512, -1).std(axis=1)
  # Each sample has one sigma ~ U(0, tau): per-sample stds fill [0, tau] uniformly.
  assert per_sample.max() < tau * 1.15 and per_sample.min() < 0.05 * tau
  assert abs(per_sample.mean() - tau / 2) < 0.03
  assert abs(np.quantile(per_sample, 0.25) - tau / 4) < 0.05
  assert abs(np.quantile(per_sample, 0.75) - 3 * tau / 4) < 0.05
  # Over the batch the noise std is tau / sqrt(3).
  assert abs(noise.std() - tau / np.sqrt(3)) < 0.02


def test_bf16_compute_keeps_float32_params():
  config = _tiny(rope=True)
  tokens = _tokens()
  model16 = pd.PixelDecoder(config, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model16.init, jax.random.key(1), tokens)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=0.2, size=a.shape), a.dtype), shapes)
  out16 = jax.jit(model16.apply)(params, tokens)
  out32 = jax.jit(pd.PixelDecoder(config).apply)(params, tokens)
  assert out16.dtype == jnp.float32
  scale = float(jnp.std(out32))
  np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=0.1 * scale)
