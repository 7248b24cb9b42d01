"""TarFlow model, objective and sampler: exactness of the flow (log-det, triangularity, inverse),
KV-cached vs recomputed decoding, guidance, denoising, compilation and sharding.

Float64 checks (`TestFloat64`) run inside `jax.enable_x64(True)`, restored after the class, with
`dtype='float64'` configs and float64 parameters perturbed away from the identity init. XLA CPU
compilation dominates the runtime, so each check compiles one function that computes everything
it compares, at XLA optimisation level 0.
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fae_jax import sharding as sharding_lib
from fae_jax.models import layers
from fae_jax.models import tarflow as tf
from fae_jax.tarflow import objective, sampler

TINY = dict(
  input_size=3,
  in_channels=2,
  patch_size=1,
  width=16,
  deep_depth=2,
  shallow_depth=1,
  num_shallow=2,
  num_heads=2,
  num_classes=3,
  noise_sigma=0.3,
)


_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_FAST_COMPILE, **kwargs)


@functools.cache
def _real_init(config: tf.TarFlowConfig):
  model = tf.TarFlow(config)
  x = np.zeros((1, config.input_size, config.input_size, config.in_channels), np.float32)
  params = _jit(model.init)(jax.random.key(0), x, np.zeros((1,), np.int32))["params"]
  return model, jax.tree.map(np.asarray, params)


def _init(config: tf.TarFlowConfig, perturb: float = 0.0, seed: int = 0):
  """`(model, params)`: the real init plus `perturb * N(0, 1)` noise (numpy, so nothing but the
  init compiles), in the config's out dtype."""
  model, params = _real_init(config)
  rng = np.random.default_rng(seed)
  dtype = config.out_dtype
  return model, jax.tree.map(
    lambda p: jnp.asarray(p + perturb * rng.standard_normal(p.shape), dtype), params
  )


def _data(config: tf.TarFlowConfig, batch: int, seed: int = 7):
  rng = np.random.default_rng(seed)
  shape = (batch, config.input_size, config.input_size, config.in_channels)
  x = jnp.asarray(rng.standard_normal(shape), config.out_dtype)
  y = jnp.asarray(rng.integers(0, max(config.num_classes, 1), batch), jnp.int32)
  return x, y


def _apply_rope_keep_float64(x, cos, sin):
  """`layers.apply_rope` computing in `promote_types(x.dtype, float32)` instead of float32.

  The shared `apply_rope` rotates in float32 whatever the input dtype (the same results for
  float32/bfloat16), which caps float64 round trips at float32 rounding amplified through the
  sequential inverse (~1e-3 here). The float64 tests swap in this version so they test the
  flow, not the RoPE precision.
  """
  dtype = x.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  x = x.astype(compute).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = x[..., 0], x[..., 1]
  c = cos[None, :, None, :].astype(compute)
  s = sin[None, :, None, :].astype(compute)
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Config, layout, counts (no compilation).
# ----------------------------------------------------------------------------------------------


def test_config_roundtrip_and_errors():
  c = tf.TarFlowConfig(**TINY)
  assert tf.TarFlowConfig.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match="Unknown TarFlowConfig keys"):
    tf.TarFlowConfig.from_dict({**c.to_dict(), "depth": 3})
  with pytest.raises(ValueError, match="scale_param"):
    tf.TarFlowConfig(**{**TINY, "scale_param": "sigmoid"})
  with pytest.raises(ValueError, match="divisible by patch_size"):
    tf.TarFlowConfig(**{**TINY, "patch_size": 2})


def test_imagenet_layout_params_and_flops():
  c = tf.TarFlowConfig()
  specs = c.flow_blocks()
  # STARFlow: five 2-layer blocks, then the 18-layer deep block on the noise side; the deep
  # block reads raster order, the orders alternate towards the data, only the deep block sees
  # the class.
  assert [s[1] for s in specs] == [2, 2, 2, 2, 2, 18]
  assert [s[2] for s in specs] == [True, False, True, False, True, False]
  assert [s[3] for s in specs] == [False] * 5 + [True]
  assert tf.count_params(c) == 1_413_310_848
  flops = tf.flow_flops_per_example(c)
  matmul = 2 * 1_413_310_848 * 256  # ~2 FLOPs per parameter per token
  attention = 2 * 2 * 257**2 * 2048 * 28
  assert 0.98 * (matmul + attention) < flops < 1.02 * (matmul + attention)
  assert tf.flow_flops_per_example(c, training=True) == pytest.approx(3 * flops)


def test_patchify_round_trip():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  t = layers.patchify(x, 2)
  assert t.shape == (2, 4, 12)
  np.testing.assert_array_equal(np.asarray(t[0, 1, :3]), np.asarray(x[0, 0, 2]))
  np.testing.assert_array_equal(np.asarray(layers.unpatchify(t, 2, 2)), np.asarray(x))


def test_guide_affine_is_the_guided_gaussian():
  rng = np.random.default_rng(0)
  mu_c, mu_u = rng.normal(size=5), rng.normal(size=5)
  a_c = rng.normal(size=5) * 0.3 - 0.5
  a_u = a_c + np.abs(rng.normal(size=5)) * 0.3  # sigma_c <= sigma_u: the clip is inactive
  mu1, a1 = tf.guide_affine(mu_c, a_c, mu_u, a_u, 1.0)
  np.testing.assert_array_equal(np.asarray(mu1), mu_c.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(a1), a_c.astype(np.float32))
  s = 2.5
  mu, a = (np.asarray(v, np.float64) for v in tf.guide_affine(mu_c, a_c, mu_u, a_u, s))

  def logn(v, m, la):
    return -0.5 * ((v - m) / np.exp(la)) ** 2 - la

  # s log p_c - (s - 1) log p_u is, up to a constant in v, the log-density of N(mu, e^{2a}).
  grid = np.linspace(-3, 3, 7)[:, None]
  diff = s * logn(grid, mu_c, a_c) - (s - 1) * logn(grid, mu_u, a_u) - logn(grid, mu, a)
  np.testing.assert_allclose(diff - diff[0], 0.0, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Float64 exactness.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="class")
def f64():
  with pytest.MonkeyPatch.context() as mp, jax.enable_x64(True):
    mp.setattr(layers, "apply_rope", _apply_rope_keep_float64)
    c = tf.TarFlowConfig(**{**TINY, "dtype": "float64"})
    model, params = _init(c, perturb=0.2)
    x, y = _data(c, 4)
    y = y.at[-1].set(c.null_class)
    yield types.SimpleNamespace(c=c, model=model, params=params, x=x, y=y)


@pytest.fixture(scope="class")
def jacobians(f64):
  """Per-block and whole-flow forward results and Jacobians of one example (one compile)."""
  c, model, params = f64.c, f64.model, f64.params
  x, y = f64.x[:1], f64.y[:1]
  specs = c.flow_blocks()

  def blocks(v):  # every block applied to the same tokens v: [T, d]
    def run(m, v):
      return [
        blk(v[None], y if spec[3] else None)
        for blk, spec in zip(m.flow_blocks(), specs, strict=True)
      ]

    return model.apply({"params": params}, v, method=run)

  def flow(v):  # v: [h, w, c]
    z, logdet = model.apply({"params": params}, v[None], y)
    return z[0], logdet[0]

  def compute(tokens, x0):
    outs = blocks(tokens)
    block_jacs = jax.jacfwd(lambda v: [z[0] for z, _ in blocks(v)])(tokens)
    t = c.num_tokens
    # The deep block (raster order) on inputs whose tokens after i are shifted by 5.
    future = jax.vmap(
      lambda i: blocks(jnp.where(jnp.arange(t)[:, None] > i, tokens + 5.0, tokens))[-1][0][0]
    )(jnp.arange(t))
    z, logdet = flow(x0)
    return {
      "block_logdets": [ld[0] for _, ld in outs],
      "block_jacs": block_jacs,
      "deep_z": outs[-1][0][0],
      "deep_future": future,
      "flow_logdet": logdet,
      "flow_jac": jax.jacfwd(lambda v: flow(v)[0])(x0),
    }

  with jax.enable_x64(True):
    tokens = layers.patchify(x, c.patch_size)[0]
    out = _jit(compute)(tokens, x[0])
    yield jax.tree.map(np.asarray, out)


@pytest.mark.usefixtures("f64")
class TestFloat64:
  def test_block_logdets_equal_slogdet_of_jacobian(self, f64, jacobians):
    n = f64.c.num_tokens * f64.c.token_dim
    for logdet, jac in zip(jacobians["block_logdets"], jacobians["block_jacs"], strict=True):
      assert abs(logdet) > 0.1  # perturbed away from the identity
      sign, slogdet = np.linalg.slogdet(jac.reshape(n, n))
      assert sign > 0
      np.testing.assert_allclose(logdet, slogdet, rtol=1e-10, atol=1e-10)

  def test_block_jacobians_are_triangular_in_block_order(self, f64, jacobians):
    t, d = f64.c.num_tokens, f64.c.token_dim
    for (_, _, reversed_order, _), jac in zip(
      f64.c.flow_blocks(), jacobians["block_jacs"], strict=True
    ):
      order = np.arange(t)[::-1] if reversed_order else np.arange(t)
      blocks = jac.reshape(t, d, t, d)[order][:, :, order]
      for i in range(t):
        # Output token i depends on input tokens <= i only ...
        np.testing.assert_array_equal(blocks[i, :, i + 1 :], 0.0)
        assert np.abs(blocks[i, :, :i]).max(initial=1.0) > 0
        # ... and on its own token through a per-channel scale.
        diag = blocks[i, :, i]
        np.testing.assert_array_equal(diag - np.diag(np.diag(diag)), 0.0)
      # A reversed block is not triangular in raster order.
      raster = jac.reshape(t, d, t, d)
      upper = [np.abs(raster[i, :, i + 1 :]).max() for i in range(t - 1)]
      assert (max(upper) > 0) == reversed_order

  def test_outputs_do_not_depend_on_future_tokens(self, f64, jacobians):
    z, future = jacobians["deep_z"], jacobians["deep_future"]
    for i in range(f64.c.num_tokens - 1):
      # Equal up to the summation order of the batched (vmapped) evaluation.
      np.testing.assert_allclose(future[i, : i + 1], z[: i + 1], rtol=0, atol=1e-14)
      assert not np.allclose(future[i, i + 1 :], z[i + 1 :])

  def test_flow_logdet_equals_slogdet_of_jacobian(self, f64, jacobians):
    n = f64.c.num_dims
    sign, slogdet = np.linalg.slogdet(jacobians["flow_jac"].reshape(n, n))
    assert sign > 0 and abs(jacobians["flow_logdet"]) > 0.1
    # jax.nn.dot_product_attention runs its softmax in float32, so derivatives through the
    # attention (the off-diagonal entries, which this non-triangular LU mixes in) carry
    # float32 rounding; the triangular per-block checks above are exact.
    np.testing.assert_allclose(jacobians["flow_logdet"], slogdet, rtol=1e-7)

  def test_inverse_recovers_input_with_and_without_cache(self, f64):
    c, model, params, x, y = f64.c, f64.model, f64.params, f64.x, f64.y

    def round_trip(x):
      z, logdet = model.apply({"params": params}, x, y)
      return (
        z,
        logdet,
        sampler.inverse(params, model, z, y, cache=True),
        sampler.inverse(params, model, z, y, cache=False),
        sampler.log_prob(params, model, x, y),
      )

    z, logdet, x_cache, x_ref, log_prob = _jit(round_trip)(x)
    assert x_cache.dtype == jnp.float64 and logdet.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(z - x))) > 0.1
    np.testing.assert_allclose(np.asarray(x_cache), np.asarray(x), rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.asarray(x_ref), np.asarray(x), rtol=0, atol=1e-8)
    expected = (
      -0.5 * jnp.sum(z**2, axis=(1, 2, 3)) - 0.5 * c.num_dims * math.log(2 * math.pi) + logdet
    )
    np.testing.assert_allclose(np.asarray(log_prob), np.asarray(expected), rtol=1e-12)

  def test_cached_sampling_guidance_and_temperature(self, f64):
    c, model, params, y = f64.c, f64.model, f64.params, f64.y

    def run(rng, g):
      kw = dict(temperature=0.9, guidance=2.5, denoise_step=False)
      z = sampler.base_noise(c, rng, y.shape[0])
      return {
        "fast": sampler.sample(params, model, rng, y, cache=True, **kw),
        "ref": sampler.sample(params, model, rng, y, cache=False, **kw),
        "cond": sampler.inverse(params, model, z, y),
        # A traced scale forces the two-stream (conditional + null class) pass.
        "one": sampler.inverse(params, model, z, y, guidance=g),
      }

    out = jax.tree.map(np.asarray, _jit(run)(jax.random.key(5), jnp.float64(1.0)))
    np.testing.assert_allclose(out["fast"], out["ref"], rtol=0, atol=1e-10)
    assert not np.allclose(out["fast"][:3], out["cond"][:3], atol=1e-2)  # guidance acts
    # Scale 1 is the conditional model (up to batch-size-dependent summation order).
    np.testing.assert_allclose(out["one"], out["cond"], rtol=0, atol=1e-10)

  def test_denoise_step_is_tweedie_with_the_flow_score(self, f64):
    model, params, x, y = f64.model, f64.params, f64.x, f64.y

    def log_density(v):  # written out independently of sampler.log_prob
      z, logdet = model.apply({"params": params}, v, y)
      return jnp.sum(-0.5 * jnp.sum(z**2, axis=(1, 2, 3)) + logdet)

    def run(x):
      return sampler.denoise(params, model, x, y), jax.grad(log_density)(x)

    out, grad = (np.asarray(a) for a in _jit(run)(x))
    assert np.abs(grad).max() > 1.0
    np.testing.assert_allclose(out, np.asarray(x) + 0.3**2 * grad, rtol=1e-6, atol=1e-8)

  def test_kv_cache_attention_matches_full_causal_attention(self, f64):
    cfg = layers.BlockConfig(width=16, num_heads=2, ffn="swiglu", norm="rmsnorm", qk_norm=True)
    block = layers.Block(cfg, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.float64)
    cos, sin = layers.rope_2d_tables((1, 5), 8)

    def run(x):
      params = block.init(jax.random.key(1), x, rope=(cos, sin), is_causal=True)
      full = block.apply(params, x, rope=(cos, sin), is_causal=True)
      cache = layers.KVCache.zeros(2, 5, 2, 8, jnp.float64)
      # A 2-token chunk, then one token at a time.
      rope = (cos[:2], sin[:2])
      out, cache = block.apply(params, x[:, :2], rope=rope, is_causal=True, cache=cache)
      outs = [out]
      for i in range(2, 5):
        rope = (cos[i : i + 1], sin[i : i + 1])
        out, cache = block.apply(params, x[:, i : i + 1], rope=rope, is_causal=True, cache=cache)
        outs.append(out)
      return full, jnp.concatenate(outs, 1), cache.index

    full, decoded, index = _jit(run)(x)
    assert int(index) == 5
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Float32: init, objective, compilation, sharding.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f32():
  # Patch 2 here (4 tokens of 8 values); the float64 tests above use patch 1.
  c = tf.TarFlowConfig(**{**TINY, "input_size": 4, "patch_size": 2})
  model, params = _init(c, perturb=0.05)
  _, params_init = _init(c)
  x, y = _data(c, 8)
  return types.SimpleNamespace(c=c, model=model, params=params, params_init=params_init, x=x, y=y)


def test_identity_at_init_loss_terms_and_round_trip(f32):
  c, model = f32.c, f32.model

  def run(params, x, y):
    z, logdet = model.apply({"params": params}, x, y)
    terms = objective.nll_terms(params, model, x, y)
    loss, metrics = objective.flow_loss(params, model, x, y, jax.random.key(0))
    return z, logdet, terms["nll"], loss, metrics

  def round_trip(params, x, y):
    z, _ = model.apply({"params": params}, x, y)
    return z, sampler.inverse(params, model, z, y)

  z, x_rec = _jit(round_trip)(f32.params, f32.x, f32.y)
  assert float(jnp.max(jnp.abs(z - f32.x))) > 0.1
  np.testing.assert_allclose(np.asarray(x_rec), np.asarray(f32.x), rtol=0, atol=1e-4)
  z, logdet, nll, loss, metrics = _jit(run)(f32.params_init, f32.x, f32.y)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(f32.x))
  np.testing.assert_array_equal(np.asarray(logdet), 0.0)
  assert logdet.dtype == jnp.float32
  # The identity flow's NLL is the standard normal's, constant included.
  expected = 0.5 * jnp.sum(f32.x**2, axis=(1, 2, 3)) + 0.5 * c.num_dims * math.log(2 * math.pi)
  np.testing.assert_allclose(np.asarray(nll), np.asarray(expected), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["bpd"]), float(loss) / math.log(2), rtol=1e-6)
  assert float(metrics["logdet_per_dim"]) == 0.0
  # With noise sigma 0.3 added, E[0.5 x~^2] per dim is 0.5 * (E x^2 + 0.09).
  assert 0.5 * math.log(2 * math.pi) + 0.3 < float(loss) < 0.5 * math.log(2 * math.pi) + 0.8
  # Label dropout replaces labels by the null class at the given rate.
  dropped = objective.drop_labels(jnp.zeros(10000, jnp.int32), jax.random.key(1), 0.1, 3)
  assert 0.08 < float(jnp.mean(dropped == 3)) < 0.12


def _loss_and_grad(model):
  def fn(params, x, y, rng):
    return jax.value_and_grad(objective.flow_loss, has_aux=True)(params, model, x, y, rng)

  return fn


def test_jitted_train_step_compiles_once(f32):
  tx = optax.adam(1e-3)
  loss_and_grad = _loss_and_grad(f32.model)

  def step(params, opt_state, x, y, rng):
    (_, metrics), grads = loss_and_grad(params, x, y, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  step = _jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, f32.params)
  opt_state = tx.init(params)
  for i in range(3):
    x, y = _data(f32.c, 8, seed=i)
    params, opt_state, metrics = step(params, opt_state, x, y, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1


def test_sharded_loss_and_grads_match_single_device(f32):
  fn = _loss_and_grad(f32.model)
  rng = jax.random.key(3)
  (loss1, _), grads1 = _jit(fn)(f32.params, f32.x, f32.y, rng)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices())
  batch, repl = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
  xs, ys = jax.device_put(f32.x, batch), jax.device_put(f32.y, batch)
  assert len(xs.sharding.device_set) == 8
  params = jax.device_put(f32.params, repl)
  (loss8, _), grads8 = _jit(fn, out_shardings=((repl, None), repl))(params, xs, ys, rng)
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    grads8,
    grads1,
  )


def test_sharded_sampling_matches_single_device(f32):
  y = jnp.arange(8) % 4  # 3 is the null class
  rng = jax.random.key(11)
  kw = dict(guidance=2.0, denoise_step=False, compiler_options=_FAST_COMPILE)
  single = sampler.make_sample_fn(f32.model, **kw)(f32.params, rng, y)
  mesh = sharding_lib.make_mesh(data=-1, fsdp=1, devices=jax.devices())
  sharded = sampler.make_sample_fn(f32.model, mesh=mesh, **kw)(f32.params, rng, y)
  assert len(sharded.sharding.device_set) == 8
  assert np.all(np.isfinite(np.asarray(sharded)))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=1e-4)
