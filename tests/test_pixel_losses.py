"""Pixel-decoder losses: GAN gating, hinge losses, adaptive weight, PSNR, feature loss, PatchGAN."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax.losses import pixel
from fae_jax.models import discriminator as disc
from fae_jax.models import layers
from fae_jax.models import pixel_decoder as pd

_TINY_D = disc.DiscriminatorConfig(base_channels=4, num_layers=2, num_groups=4)


def _images(seed, shape=(2, 16, 16, 3)):
  return jnp.asarray(np.tanh(np.random.default_rng(seed).normal(size=shape)), jnp.float32)


def _np_init(model, *args, seed=0):
  """Random params of `model` drawn with numpy (a flax init compiles every PRNG op: slow on CPU).

  Kernels ~ N(0, 1 / fan_in), biases ~ N(0, 0.01), norm scales 1, other tables ~ N(0, 0.02).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "kernel":
      value = rng.normal(scale=1 / np.sqrt(np.prod(leaf.shape[:-1])), size=leaf.shape)
    else:
      value = rng.normal(scale=0.01 if name == "bias" else 0.02, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_d():
  """A small PatchGAN and its params for 16x16 images."""
  model = disc.PatchDiscriminator(_TINY_D)
  return model, _np_init(model, _images(0), seed=2)


def test_gan_term_and_gradient_are_zero_before_gan_start(tiny_d):
  target, recon = _images(0), _images(1)
  d_model, d_params = tiny_d

  def loss(recon, d_params, step, with_gan):
    logits = d_model.apply(d_params, recon) if with_gan else None
    return pixel.pixel_loss(
      target, recon, gan_logits_fake=logits, gan_weight=0.5, step=step, gan_start=10
    )

  # One compilation serves every step: the gate is traced, not a Python branch.
  grad_fn = jax.jit(
    jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnames="with_gan"
  )
  (base, _), (g_base, _) = grad_fn(recon, d_params, jnp.int32(0), with_gan=False)
  for step, active in ((0, False), (9, False), (10, True), (1000, True)):
    (value, metrics), (g_recon, g_d) = grad_fn(recon, d_params, jnp.int32(step), with_gan=True)
    gan_grad = np.asarray(g_recon - g_base)
    d_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(g_d))
    if active:
      np.testing.assert_allclose(value, base + 0.5 * metrics["g_loss"], rtol=1e-6)
      assert np.abs(gan_grad).max() > 0 and d_norm > 0
      assert metrics["gan_weight"] == 0.5 and metrics["gan_active"] == 1.0
    else:
      assert value == base
      np.testing.assert_array_equal(gan_grad, 0.0)
      assert d_norm == 0.0
      assert metrics["gan_weight"] == 0.0 and metrics["gan_active"] == 0.0
  assert grad_fn._cache_size() == 2


def test_discriminator_loss_is_gated():
  real, fake = jnp.array([[0.3, -2.0]]), jnp.array([[0.1, 1.5]])
  off, m_off = pixel.discriminator_loss(real, fake, step=4, gan_start=5)
  on, m_on = pixel.discriminator_loss(real, fake, step=5, gan_start=5)
  assert off == 0.0 and m_off["gan_active"] == 0.0
  np.testing.assert_allclose(on, pixel.d_hinge_loss(real, fake))
  g = jax.grad(lambda r: pixel.discriminator_loss(r, fake, step=4, gan_start=5)[0])(real)
  np.testing.assert_array_equal(np.asarray(g), 0.0)
  assert m_on["gan_active"] == 1.0


def test_hinge_losses_on_hand_computed_values():
  real = jnp.array([[2.0, 0.5], [-1.0, 0.0]])
  fake = jnp.array([[-2.0, 0.5], [1.0, -0.5]])
  # relu(1 - real) = [0, .5, 2, 1] -> .875; relu(1 + fake) = [0, 1.5, 2, .5] -> 1.0.
  np.testing.assert_allclose(pixel.d_hinge_loss(real, fake), 0.5 * (0.875 + 1.0), rtol=1e-7)
  np.testing.assert_allclose(pixel.g_hinge_loss(fake), 0.25, rtol=1e-7)
  # A confident, correct discriminator has zero loss.
  assert pixel.d_hinge_loss(jnp.full((2, 3), 1.5), jnp.full((2, 3), -1.0)) == 0.0


def test_adaptive_weight_formula():
  np.testing.assert_allclose(pixel.adaptive_gan_weight(2.0, 1.0), 2.0 / (1.0 + 1e-4), rtol=1e-7)
  np.testing.assert_allclose(pixel.adaptive_gan_weight(0.5, 0.0), 0.5 / 1e-4, rtol=1e-6)
  assert pixel.adaptive_gan_weight(1e6, 1e-3) == 1e4  # clipped at max_weight
  assert pixel.adaptive_gan_weight(1e6, 1e-3, max_weight=7.0) == 7.0
  assert pixel.adaptive_gan_weight(0.0, 1.0) == 0.0
  grads = jax.grad(lambda a, b: pixel.adaptive_gan_weight(a, b), argnums=(0, 1))(2.0, 1.0)
  assert grads == (0.0, 0.0)  # a weight, not a loss term


def test_last_layer_grad_norms_on_a_known_function():
  rng = np.random.default_rng(0)
  w, a = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  params = {"head": {"kernel": jnp.asarray(w), "bias": jnp.ones(3)}, "embed": {"kernel": 2.0}}

  def terms(p):
    rec = jnp.sum(a * p["head"]["kernel"]) + p["embed"]["kernel"] * jnp.sum(p["head"]["bias"])
    return rec, 0.5 * jnp.sum(jnp.square(p["head"]["kernel"]))

  rec_norm, gan_norm = pixel.last_layer_grad_norms(terms, params)
  np.testing.assert_allclose(rec_norm, np.linalg.norm(a), rtol=1e-6)
  np.testing.assert_allclose(gan_norm, np.linalg.norm(w), rtol=1e-6)
  with pytest.raises(KeyError, match="no parameter at head/weight"):
    pixel.last_layer_grad_norms(terms, params, path=("head", "weight"))


def test_last_layer_grad_norms_match_full_gradients_of_the_decoder(tiny_d):
  config = pd.PixelDecoderConfig(
    feature_dim=8, grid=(2, 2), width=16, depth=1, num_heads=2, patch_size=8
  )
  decoder = pd.PixelDecoder(config)
  d_model, d_params = tiny_d
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 8)), jnp.float32)
  target = _images(1)
  params = _np_init(decoder, tokens, seed=3)["params"]

  def terms(p):
    recon = decoder.apply({"params": p}, tokens)
    return pixel.reconstruction_loss(target, recon), pixel.g_hinge_loss(
      d_model.apply(d_params, recon)
    )

  rec_norm, gan_norm = jax.jit(functools.partial(pixel.last_layer_grad_norms, terms))(params)
  g_rec, g_gan = jax.jit(jax.jacrev(terms))(params)
  g_rec, g_gan = g_rec["head"]["kernel"], g_gan["head"]["kernel"]
  np.testing.assert_allclose(rec_norm, jnp.linalg.norm(g_rec), rtol=1e-5)
  np.testing.assert_allclose(gan_norm, jnp.linalg.norm(g_gan), rtol=1e-5)
  assert float(gan_norm) > 0
  weight = pixel.adaptive_gan_weight(rec_norm, gan_norm)
  np.testing.assert_allclose(weight, rec_norm / (gan_norm + 1e-4), rtol=1e-6)


def test_psnr_identical_is_capped_and_known_noise_matches_closed_form():
  target = jnp.asarray(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 8, 8, 3)), jnp.float32)
  assert pixel.psnr(target, target) == 100.0  # capped (MSE floor 1e-10)
  assert pixel.psnr(target, target, max_db=60.0) == 60.0
  # Values outside [-1, 1] are clipped first: a saturated pixel is not an error.
  ones = jnp.ones((1, 4, 4, 3))
  assert pixel.psnr(ones, 3.0 * ones) == 100.0
  # +-a noise in [-1, 1] is +-a/2 in [0, 1]: PSNR = -10 log10(a^2 / 4), per image.
  signs = jnp.where(jnp.arange(8 * 8 * 3).reshape(1, 8, 8, 3) % 2 == 0, 1.0, -1.0)
  amps = jnp.array([0.1, 0.02]).reshape(2, 1, 1, 1)
  recon = target + amps * signs
  per_image = pixel.psnr(target, recon, reduce=False)
  want = [-10 * math.log10(a * a / 4) for a in (0.1, 0.02)]
  np.testing.assert_allclose(per_image, want, rtol=1e-4)
  np.testing.assert_allclose(pixel.psnr(target, recon), np.mean(want), rtol=1e-4)


def test_reconstruction_and_perceptual_terms():
  target, recon = _images(0), _images(1)
  diff = np.asarray(recon) - np.asarray(target)
  loss_l1, m = pixel.pixel_loss(target, recon, rec="l1", rec_weight=2.0)
  np.testing.assert_allclose(loss_l1, 2.0 * np.abs(diff).mean(), rtol=1e-6)
  np.testing.assert_allclose(m["l2"], np.square(diff).mean(), rtol=1e-6)
  assert "perceptual" not in m and "g_loss" not in m
  loss_l2, m = pixel.pixel_loss(
    target, recon, rec="l2", perceptual_fn=lambda t, r: jnp.float32(3.0), perc_weight=0.1
  )
  np.testing.assert_allclose(loss_l2, np.square(diff).mean() + 0.3, rtol=1e-6)
  assert m["perceptual"] == 3.0 and m["loss"] == loss_l2
  with pytest.raises(ValueError, match="Unknown reconstruction loss"):
    pixel.pixel_loss(target, recon, rec="huber")


def test_dino_feature_loss():
  proj = jnp.asarray(np.random.default_rng(5).normal(size=(4 * 4 * 3, 6)), jnp.float32)

  def encode(images):  # a stand-in frozen encoder: 4x4 patches -> linear features [B, 16, 6]
    return layers.patchify(images, 4) @ proj

  target, recon = _images(0), _images(1)
  want = np.mean(np.square(np.asarray(encode(recon)) - np.asarray(encode(target))))
  np.testing.assert_allclose(pixel.dino_feature_loss(encode, target, recon), want, rtol=1e-5)
  assert pixel.dino_feature_loss(encode, target, target) == 0.0
  g_target, g_recon = jax.grad(lambda t, r: pixel.dino_feature_loss(encode, t, r), argnums=(0, 1))(
    target, recon
  )
  np.testing.assert_array_equal(np.asarray(g_target), 0.0)  # targets are constants
  assert float(jnp.abs(g_recon).max()) > 0
  perc = functools.partial(pixel.dino_feature_loss, encode)
  loss, m = pixel.pixel_loss(target, recon, perceptual_fn=perc, perc_weight=1.0)
  np.testing.assert_allclose(m["perceptual"], want, rtol=1e-5)


def test_patch_discriminator_shapes_and_params(tiny_d):
  model = disc.PatchDiscriminator()
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  )
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == 2_765_633
  assert jax.eval_shape(model.apply, shapes, jnp.zeros((1, 256, 256, 3))).shape == (1, 30, 30, 1)
  # No norm: every convolution has a bias; with GroupNorm only the first and last do.
  for norm, biased in (("none", {0, 1, 2, 3}), ("group", {0, 3})):
    small = disc.PatchDiscriminator(
      disc.DiscriminatorConfig(base_channels=4, num_layers=2, norm=norm)
    )
    params = _np_init(small, jnp.zeros((2, 32, 32, 3)))["params"]
    assert {i for i in range(4) if "bias" in params[f"conv_{i}"]} == biased
    logits = small.apply({"params": params}, _images(2, (2, 32, 32, 3)))
    assert logits.shape == (2, 6, 6, 1) and logits.dtype == jnp.float32
  # Per-sample normalisation: a sample's logits do not depend on the rest of the batch.
  d_model, d_params = tiny_d
  x = _images(3, (3, 16, 16, 3))
  np.testing.assert_allclose(
    d_model.apply(d_params, x)[:1], d_model.apply(d_params, x[:1]), rtol=1e-5, atol=1e-6
  )
  with pytest.raises(ValueError, match="not one of"):
    disc.DiscriminatorConfig(norm="batch")
