"""FAE adapter, posterior, feature decoder, loss and FLOP count."""

import dataclasses
import functools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fae_jax.evaluation import features
from fae_jax.losses import fae as fae_losses
from fae_jax.models import fae, layers

TINY = fae.FaeConfig(
  feature_dim=32,
  grid=(4, 4),
  latent_dim=4,
  adapter_depth=1,
  adapter_heads=2,
  adapter_head_dim=8,
  decoder_depth=1,
  decoder_width=32,
  decoder_heads=2,
  decoder_head_dim=8,
)

# Tests are dominated by XLA:CPU compile time; LLVM -O0 compiles ~3x faster and changes no
# HLO semantics.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _tokens(config, batch=2, seed=0):
  shape = (batch, config.num_tokens, config.feature_dim)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _init(config, x, dtype=jnp.float32):
  model = fae.Fae(config, dtype=dtype)
  return _jit(lambda x: model.init(jax.random.key(1), x, sample_posterior=False))(x)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------
# Config.


def test_config_json_round_trip_and_errors():
  config = dataclasses.replace(TINY, adapter_pos="rope", logvar_clip=(-10.0, 5.0))
  restored = fae.FaeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
  assert restored == config
  with pytest.raises(ValueError, match="adapter_dpeth"):
    fae.FaeConfig.from_dict({"adapter_dpeth": 2})
  with pytest.raises(ValueError, match="decoder_out_proj=False"):
    dataclasses.replace(TINY, decoder_out_proj=False, decoder_width=16)
  with pytest.raises(ValueError, match="adapter_pos"):
    dataclasses.replace(TINY, adapter_pos="sincos")
  with pytest.raises(ValueError, match="adapter_norm='none'"):
    dataclasses.replace(TINY, adapter_depth=2, adapter_norm="none")


# ----------------------------------------------------------------------------------------------
# Shapes and structure.


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_shapes_per_adapter_depth(depth):
  config = dataclasses.replace(TINY, adapter_depth=depth)
  model = fae.Fae(config)
  x = _tokens(config, batch=3)
  params = _init(config, x)

  @_jit
  def run(params, x):
    out = model.apply(params, x, jax.random.key(2))
    encoded = model.apply(params, x, method=fae.Fae.encode)
    decoded = model.apply(params, out["z"], method=fae.Fae.decode)
    return out, encoded, decoded

  out, (mean, logvar), x_hat = run(params, x)
  assert out["x_hat"].shape == (3, 16, 32)
  for name in ("mean", "logvar", "z"):
    assert out[name].shape == (3, 4, 4, 4), name
  for value in out.values():
    assert value.dtype == jnp.float32
  np.testing.assert_allclose(mean, out["mean"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(logvar, out["logvar"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(x_hat, out["x_hat"], rtol=1e-5, atol=1e-5)
  enc = params["params"]["encoder"]
  if depth == 0:
    assert set(enc) == {"to_moments"}
  elif depth == 1:
    assert set(enc) == {"pos_embed", "norm", "attn", "to_moments"}
    assert enc["attn"]["qkv"]["kernel"].shape == (32, 3 * 2 * 8)
  else:
    assert set(enc) == {"pos_embed", "blocks_0", "blocks_1", "norm", "to_moments"}
  assert set(params["params"]["decoder"]) == {"embed", "pos_embed", "blocks_0", "norm", "head"}


def test_fae_call_modes():
  model = fae.Fae(TINY)
  x = _tokens(TINY)
  params = _init(TINY, x)
  det = _jit(functools.partial(model.apply, sample_posterior=False))(params, x)
  np.testing.assert_array_equal(det["z"], det["mean"])
  sampled = _jit(model.apply)
  a, b, c = (sampled(params, x, jax.random.key(k)) for k in (5, 5, 6))
  np.testing.assert_array_equal(a["z"], b["z"])
  assert not np.allclose(a["z"], c["z"])
  np.testing.assert_allclose(a["mean"], det["mean"], rtol=1e-6, atol=1e-6)
  # Both errors are raised before any computation.
  with pytest.raises(ValueError, match="rng"):
    model.apply(params, x)
  with pytest.raises(ValueError, match=r"\[B, 16, 32\]"):
    model.apply(params, x[:, :8], sample_posterior=False)


def test_single_attention_adapter_structure():
  """With the attention output zeroed, depth 1 is `Dense(gelu(x + pos))`: residual then act."""
  x = _tokens(TINY)
  params = flax.core.unfreeze(_init(TINY, x))
  enc = params["params"]["encoder"]
  enc["attn"]["proj"] = jax.tree.map(jnp.zeros_like, enc["attn"]["proj"])
  encode = functools.partial(fae.Fae(TINY).apply, method=fae.Fae.encode)
  mean, logvar = _jit(encode)(params, x)
  h = np.asarray(_jit(layers.gelu_exact)(x + enc["pos_embed"]))
  moments = h @ np.asarray(enc["to_moments"]["kernel"]) + np.asarray(enc["to_moments"]["bias"])
  np.testing.assert_allclose(mean.reshape(2, 16, 4), moments[..., :4], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logvar.reshape(2, 16, 4), moments[..., 4:], rtol=1e-5, atol=1e-5)


def test_logvar_is_clipped():
  config = dataclasses.replace(TINY, adapter_depth=0)
  x = _tokens(config)
  params = flax.core.unfreeze(_init(config, x))
  head = params["params"]["encoder"]["to_moments"]
  head["kernel"] = jnp.zeros_like(head["kernel"])
  head["bias"] = jnp.array([0.0] * 4 + [100.0, -100.0, 3.0, -3.0])
  encode = functools.partial(fae.Fae(config).apply, method=fae.Fae.encode)
  _, logvar = _jit(encode)(params, x)
  np.testing.assert_array_equal(logvar[0, 0, 0], [20.0, -30.0, 3.0, -3.0])


# ----------------------------------------------------------------------------------------------
# Posterior.


def test_kl_matches_numpy_closed_form():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
  logvar = rng.normal(size=(3, 2, 2, 5)).astype(np.float32)
  # General KL(N(m1, s1^2) || N(m2, s2^2)) with m2 = 0, s2 = 1.
  s1 = np.exp(0.5 * logvar.astype(np.float64))
  expected = np.log(1.0 / s1) + (s1**2 + mean.astype(np.float64) ** 2) / 2.0 - 0.5
  kl = _jit(fae.kl_to_standard_normal)(mean, logvar)
  np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-6)
  kl = _jit(lambda m, lv: fae.DiagonalGaussian(m, lv).kl())(mean, logvar)
  np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-6)
  zeros = np.zeros((2, 3), np.float32)
  np.testing.assert_array_equal(_jit(fae.kl_to_standard_normal)(zeros, zeros), zeros)


def test_sampling_statistics():
  n = 20000
  mean = np.array([0.0, 1.5, -2.0, 0.3], np.float32)
  logvar = np.log(np.array([1.0, 0.25, 4.0, 0.0025], np.float32))
  keys = jax.random.split(jax.random.key(0), n)
  draw = _jit(jax.vmap(fae.sample, in_axes=(None, None, 0)))
  samples = np.asarray(draw(mean, logvar, keys), np.float64)
  sigma = np.exp(0.5 * logvar.astype(np.float64))
  # 5 standard errors: a false failure has probability ~1e-6 per element.
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * sigma / np.sqrt(n))
  np.testing.assert_array_less(np.abs(samples.std(0) - sigma), 5 * sigma / np.sqrt(2 * n))
  dist = fae.DiagonalGaussian(jnp.asarray(mean), jnp.asarray(logvar))
  np.testing.assert_allclose(dist.std(), sigma, rtol=1e-6)
  np.testing.assert_array_equal(dist.mode(), mean)
  np.testing.assert_allclose(dist.sample(keys[0]), samples[0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Loss and metrics.


def test_loss_is_rec_plus_beta_kl():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 16, 32)).astype(np.float32)
  x_hat = x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
  mean = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
  logvar = rng.normal(size=(3, 4, 4, 4)).astype(np.float32)
  loss_fn = _jit(fae_losses.fae_loss, static_argnames="beta")
  beta = 1e-2
  loss, m = loss_fn(x, x_hat, mean, logvar, beta=beta)
  rec = np.mean((x_hat.astype(np.float64) - x) ** 2)
  kl_elem = 0.5 * (mean.astype(np.float64) ** 2 + np.exp(logvar) - 1 - logvar)
  kl = kl_elem.sum() / 3
  np.testing.assert_allclose(m["rec_mse"], rec, rtol=1e-5)
  np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
  # One normalisation: the LDM per-example objective divided by N x D (16 x 32 here).
  np.testing.assert_allclose(loss, rec + beta * kl / (16 * 32), rtol=1e-5)
  np.testing.assert_allclose(m["loss"], loss)
  np.testing.assert_allclose(m["kl_per_channel"], kl_elem.sum((0, 1, 2)) / 3, rtol=1e-5)
  np.testing.assert_allclose(m["kl_per_channel"].sum(), m["kl"], rtol=1e-5)
  flat = mean.reshape(-1, 4)
  np.testing.assert_allclose(m["latent_mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["latent_std"], flat.std(0), rtol=1e-5)
  np.testing.assert_allclose(m["posterior_std_mean"], np.exp(0.5 * logvar).mean(), rtol=1e-5)
  np.testing.assert_allclose(
    m["relative_mse"], ((x_hat - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum(), rtol=1e-5
  )
  for value in m.values():
    assert value.dtype == jnp.float32
  assert m["latent_mean"].shape == (4,)
  zero_kl_loss, m0 = loss_fn(x, x_hat, mean * 0, logvar * 0, beta=1.0)
  assert float(m0["kl"]) == 0.0
  np.testing.assert_allclose(zero_kl_loss, rec, rtol=1e-5)


def test_loss_normalisation_hand_computed():
  """One example, N=2 tokens, D=2 channels, one latent element: every term by hand."""
  x = np.array([[[1.0, 0.0], [0.0, 2.0]]], np.float32)
  x_hat = np.array([[[0.0, 0.0], [0.0, 0.0]]], np.float32)
  mean = np.full((1, 1, 1, 1), 2.0, np.float32)
  logvar = np.zeros((1, 1, 1, 1), np.float32)
  # squared error sum 1 + 4 = 5 over N*D = 4 elements -> 1.25; KL = 0.5 * (2^2 + 1 - 1 - 0) = 2.
  # LDM objective 5 + beta * 2; divided by N*D = 4: 1.25 + beta * 0.5.
  loss, m = _jit(fae_losses.fae_loss, static_argnames="beta")(x, x_hat, mean, logvar, beta=0.1)
  np.testing.assert_allclose(m["rec_mse"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(m["kl"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(loss, 1.25 + 0.1 * 0.5, rtol=1e-6)


def test_feature_metrics():
  x = _tokens(TINY)
  zeros = np.zeros((2, 4, 4, 4), np.float32)
  _, m = _jit(fae_losses.fae_loss)(x, x, zeros, zeros)
  np.testing.assert_allclose(m["feature_cosine"], 1.0, rtol=1e-6)
  assert float(m["relative_mse"]) == 0.0
  assert float(m["rec_mse"]) == 0.0
  cosine = _jit(features.cosine_similarity)
  np.testing.assert_allclose(cosine(x, 2.0 * x), np.ones((2, 16)), rtol=1e-6)
  np.testing.assert_allclose(cosine(x, -x), -np.ones((2, 16)), rtol=1e-6)
  np.testing.assert_allclose(_jit(features.relative_mse)(x, 2.0 * x), 1.0, rtol=1e-6)
  assert float(cosine(np.zeros(4), np.ones(4))) == 0.0


def test_fae_trains_on_a_fixed_batch():
  """Model + loss wired together: a few Adam steps cut the reconstruction error."""
  model = fae.Fae(TINY)
  x = _tokens(TINY, batch=4)
  params = _init(TINY, x)
  opt = optax.adam(3e-3)

  @_jit
  def step(params, opt_state, i):
    def loss_fn(params):
      out = model.apply(params, x, jax.random.fold_in(jax.random.key(0), i))
      return fae_losses.fae_loss(x, out["x_hat"], out["mean"], out["logvar"])

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = opt.init(params)
  history = []
  for i in range(60):
    params, opt_state, metrics = step(params, opt_state, i)
    history.append(float(metrics["rec_mse"]))
  assert np.isfinite(history).all()
  assert history[-1] < 0.5 * history[0], history


# ----------------------------------------------------------------------------------------------
# Precision and positions.


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  x = _tokens(TINY)
  params = _init(TINY, x, dtype=jnp.bfloat16)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  model_f32, model_bf16 = fae.Fae(TINY), fae.Fae(TINY, dtype=jnp.bfloat16)

  @_jit
  def run(params, x):
    ref = model_f32.apply(params, x, sample_posterior=False)
    return ref, model_bf16.apply(params, x, sample_posterior=False)

  ref, out = run(params, x)
  for name in ("x_hat", "mean", "logvar", "z"):
    assert out[name].dtype == jnp.float32, name
    err = np.linalg.norm(out[name] - ref[name]) / np.linalg.norm(ref[name])
    assert err < 3e-2, (name, err)
    assert err > 0, name  # bf16 really was used


@pytest.mark.parametrize(
  ("rope", "pos", "equivariant"),
  [(False, "none", True), (True, "none", False), (False, "learned", False)],
)
def test_decoder_positions(rope, pos, equivariant):
  """Without position signal the decoder is permutation equivariant; RoPE or a table breaks it."""
  config = dataclasses.replace(TINY, decoder_rope=rope, decoder_pos=pos)
  model = fae.Fae(config)
  params = _init(config, _tokens(config))
  perm = np.random.default_rng(0).permutation(16)
  z = np.random.default_rng(3).normal(size=(2, 4, 4, 4)).astype(np.float32)
  z_perm = z.reshape(2, 16, 4)[:, perm].reshape(z.shape)
  decode = _jit(functools.partial(model.apply, method=fae.Fae.decode))
  gap = float(np.max(np.abs(decode(params, z_perm) - decode(params, z)[:, perm])))
  assert gap < 1e-5 if equivariant else gap > 1e-2


@pytest.mark.parametrize("pos", ["none", "rope", "learned"])
def test_adapter_positions(pos):
  """Only a position-free adapter is permutation equivariant."""
  config = dataclasses.replace(TINY, adapter_pos=pos)
  model = fae.Fae(config)
  x = _tokens(TINY)
  params = _init(config, x)
  perm = np.random.default_rng(1).permutation(16)
  encode = _jit(functools.partial(model.apply, method=fae.Fae.encode))
  mean = np.asarray(encode(params, x)[0]).reshape(2, 16, 4)
  mean_perm = np.asarray(encode(params, x[:, perm])[0]).reshape(2, 16, 4)
  gap = float(np.max(np.abs(mean_perm - mean[:, perm])))
  assert gap < 1e-5 if pos == "none" else gap > 1e-3


# ----------------------------------------------------------------------------------------------
# FLOPs and parameter counts.


@pytest.mark.parametrize(
  "overrides",
  [
    {"adapter_depth": 0},
    {"adapter_depth": 1},
    {"adapter_depth": 2, "decoder_ffn": "mlp", "decoder_out_proj": False},
  ],
)
def test_flops_match_xla_cost_analysis(overrides):
  # Wide enough that matmuls dominate the elementwise ops that XLA also counts.
  config = fae.FaeConfig(
    feature_dim=256,
    grid=(4, 8),
    latent_dim=8,
    adapter_heads=2,
    adapter_head_dim=64,
    decoder_depth=2,
    decoder_width=256,
    decoder_heads=4,
    decoder_head_dim=64,
    **overrides,
  )
  model = fae.Fae(config)
  x = jax.ShapeDtypeStruct((1, config.num_tokens, config.feature_dim), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, sample_posterior=False), x)
  fn = _jit(lambda p, x: model.apply(p, x, sample_posterior=False)["x_hat"])
  cost = fn.lower(params, x).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  if not cost or "flops" not in cost:
    pytest.skip("XLA cost_analysis unavailable on this backend")
  analytic = fae.fae_flops_per_example(config)
  # XLA also counts norms, softmax and the erf-GELU polynomial (1-5% here), never less.
  assert 0 <= (cost["flops"] - analytic) / analytic < 0.1, (cost["flops"], analytic)
  assert fae.fae_flops_per_example(config, training=True) == 3 * analytic


def test_imagenet_parameter_counts():
  """Pins the counts discussed in the fae.py docstring (paper: 38.17M and 170.43M)."""
  x = jax.ShapeDtypeStruct((1, 256, 1536), jnp.float32)

  def counts(config):
    model = fae.Fae(config)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, sample_posterior=False), x)
    return _count(params["params"]["encoder"]), _count(params["params"]["decoder"])

  assert counts(fae.FaeConfig()) == (38_263_360, 172_789_248)
  enc, dec = counts(fae.FaeConfig(decoder_out_proj=False, adapter_pos="none"))
  assert enc == 37_870_144
  assert dec == 170_428_416  # the paper's 170.43M
