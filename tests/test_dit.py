"""SiT / LightningDiT generator: adaLN-Zero init, conditioning, label dropout, RoPE, FLOPs."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax.models import dit, layers

TINY = dit.DitConfig(
  input_size=4,
  in_channels=3,
  patch_size=1,
  width=32,
  depth=2,
  num_heads=2,
  num_classes=5,
  class_dropout=0.5,
  ffn="mlp",
  rope=False,
  norm="layernorm",
)
ALL_ON = dataclasses.replace(
  TINY, patch_size=2, ffn="swiglu", rope=True, norm="rmsnorm", qk_norm=True, pos_embed="learned"
)

# Tests are dominated by XLA:CPU compile time; LLVM -O0 compiles ~3x faster and changes no
# HLO semantics.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _inputs(config, batch=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, config.input_size, config.input_size, config.in_channels))
  t = rng.uniform(size=(batch,))
  y = rng.integers(0, config.num_classes, size=(batch,))
  return x.astype(np.float32), t.astype(np.float32), y.astype(np.int32)


def _init(config, x, t, y):
  model = dit.Dit(config)
  return _jit(lambda x, t, y: model.init(jax.random.key(0), x, t, y, train=False)["params"])(
    x, t, y
  )


@_jit
def _perturb(params, seed=1, scale=0.1):
  """Adds N(0, scale^2) to every parameter, so the zero-initialised layers come alive."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


@functools.cache
def _apply_fn(config):
  """One jitted eval forward per config (tests share it, so each shape compiles once)."""
  model = dit.Dit(config)

  @_jit
  def apply(params, x, t, y, drop):
    return model.apply({"params": params}, x, t, y, train=False, force_drop_ids=drop)

  def call(params, x, t, y, drop=None):
    # An explicit all-zero drop mask keeps one compiled signature for both uses.
    return apply(params, x, t, y, np.zeros(len(x), np.int32) if drop is None else drop)

  return call


@pytest.fixture(scope="module")
def all_on():
  """Perturbed ALL_ON params and a batch of 4 inputs."""
  x, t, y = _inputs(ALL_ON)
  return _perturb(_init(ALL_ON, x, t, y)), x, t, y


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_config_round_trip_variants_and_errors():
  config = dit.DitConfig.from_variant("B/2", in_channels=8, input_size=8, lightning=False)
  assert (config.width, config.depth, config.num_heads, config.patch_size) == (768, 12, 12, 2)
  assert (config.ffn, config.rope, config.norm) == ("mlp", False, "layernorm")
  light = dit.DitConfig.from_variant("XL/1", qk_norm=True)
  assert (light.ffn, light.rope, light.norm, light.qk_norm) == ("swiglu", True, "rmsnorm", True)
  assert dit.DitConfig.from_dict(json.loads(json.dumps(light.to_dict()))) == light
  with pytest.raises(ValueError, match="Unknown DiT variant"):
    dit.DitConfig.from_variant("XXL/2")
  with pytest.raises(ValueError, match="widht"):
    dit.DitConfig.from_dict({"widht": 3})
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    dataclasses.replace(TINY, input_size=5, patch_size=2)


@pytest.mark.parametrize("config", [TINY, dataclasses.replace(TINY, patch_size=2), ALL_ON])
def test_output_is_exactly_zero_at_init(config):
  x, t, y = _inputs(config)
  params = _init(config, x, t, y)
  out = _apply_fn(config)(params, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)
  # adaLN-Zero: every modulation and the output projection start at zero.
  for i in range(config.depth):
    assert not np.any(np.asarray(params[f"blocks_{i}"]["adaLN_modulation"]["kernel"]))
  assert not np.any(np.asarray(params["final_layer"]["linear"]["kernel"]))


def test_output_depends_on_t_and_y_after_perturbation(all_on):
  params, x, t, y = all_on
  apply = _apply_fn(ALL_ON)
  base = np.asarray(apply(params, x, t, y))
  assert np.abs(base).max() > 1e-3
  other_t = np.asarray(apply(params, x, (t + 0.37) % 1.0, y))
  other_y = np.asarray(apply(params, x, t, (y + 1) % ALL_ON.num_classes))
  for other in (other_t, other_y):
    per_example = np.abs(other - base).reshape(len(x), -1).max(axis=1)
    assert np.all(per_example > 1e-4), per_example
  # Examples do not leak into each other: reversing the batch reverses the output.
  np.testing.assert_allclose(apply(params, x[::-1], t[::-1], y[::-1]), base[::-1], atol=1e-5)


def test_label_dropout_and_null_class(all_on):
  params, x, t, y = all_on
  config = ALL_ON
  apply = _apply_fn(config)
  model = dit.Dit(config)
  # Evaluation (train=False): labels pass through and no rng is needed.
  base = np.asarray(apply(params, x, t, y))

  # Forced drop == explicitly passing the null class, index num_classes; the rest untouched.
  drop = np.array([1, 0, 1, 0], np.int32)
  forced = np.asarray(apply(params, x, t, y, drop))
  null_y = np.where(drop == 1, config.num_classes, y).astype(np.int32)
  np.testing.assert_allclose(forced, np.asarray(apply(params, x, t, null_y)), atol=1e-6)
  np.testing.assert_allclose(forced[1::2], base[1::2], atol=1e-6)
  assert np.abs(forced[0::2] - base[0::2]).max() > 1e-4
  assert params["y_embedder"]["embedding_table"]["embedding"].shape == (6, config.width)

  # Training: each label is dropped (p=0.5) by a draw from the 'dropout' stream.
  train_fwd = _jit(
    lambda p, r: model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": r})
  )
  dropped = np.asarray(apply(params, x, t, null_y * 0 + config.num_classes))
  seen = np.zeros(len(x), int)
  for seed in range(3):
    out = np.asarray(train_fwd(params, jax.random.key(seed)))
    is_kept = np.abs(out - base).reshape(len(x), -1).max(1) < 1e-5
    is_dropped = np.abs(out - dropped).reshape(len(x), -1).max(1) < 1e-5
    assert np.all(is_kept ^ is_dropped)
    seen += is_dropped
  assert 0 < seen.sum() < 3 * len(x)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply({"params": params}, x, t, y, train=True))


def test_shapes_with_odd_channel_counts():
  config = dataclasses.replace(ALL_ON, in_channels=7, input_size=6, patch_size=2)
  x, t, y = _inputs(config, batch=2)
  params = _init(config, x, t, y)
  assert _apply_fn(config)(params, x, t, y).shape == (2, 6, 6, 7)
  assert params["x_embedder"]["kernel"].shape == (2 * 2 * 7, config.width)
  assert params["final_layer"]["linear"]["kernel"].shape == (config.width, 2 * 2 * 7)
  for patch in (1, 2):
    # SiT's learn_sigma: twice the output channels, the second half dropped.
    sigma = dataclasses.replace(config, learn_sigma=True, patch_size=patch)
    model = dit.Dit(sigma)
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, t, y, train=False))
    kernel = variables["params"]["final_layer"]["linear"]["kernel"]
    assert kernel.shape == (config.width, patch * patch * 14)
    out = jax.eval_shape(lambda v, m=model: m.apply(v, x, t, y, train=False), variables)
    assert out.shape == (2, 6, 6, 7)


def test_patchify_round_trip():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  tokens = layers.patchify(jnp.asarray(x), 2)
  assert tokens.shape == (2, 4, 12)
  # Token 1 is the top-right 2x2 patch, flattened (dy, dx, c).
  np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(layers.unpatchify(tokens, 2, 2), x)


def test_rope_no_change_at_init_but_breaks_permutation_equivariance():
  base = dataclasses.replace(TINY, pos_embed="none", ffn="swiglu", norm="rmsnorm")
  with_rope = dataclasses.replace(base, rope=True)
  x, t, y = _inputs(base, batch=2)
  p_plain = _init(base, x, t, y)
  # RoPE adds no parameters (same tree, so the same seed gives the same values) and at init the
  # output is zero either way.
  init_rope = lambda: dit.Dit(with_rope).init(jax.random.key(0), x, t, y, train=False)  # noqa: E731
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), jax.eval_shape(init_rope)["params"])
  assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), p_plain)
  assert not np.any(np.asarray(_apply_fn(with_rope)(p_plain, x, t, y)))

  params = _perturb(p_plain)
  perm = np.random.default_rng(0).permutation(base.num_tokens)

  def permute(a):
    flat = a.reshape(a.shape[0], base.num_tokens, -1)[:, perm]
    return flat.reshape(a.shape)

  plain = _apply_fn(base)
  # No positional signal at all: the network is equivariant to token permutations...
  np.testing.assert_allclose(
    plain(params, permute(x), t, y), permute(np.asarray(plain(params, x, t, y))), atol=1e-5
  )
  # ...and RoPE makes it position dependent.
  rope = _apply_fn(with_rope)
  diff = np.asarray(rope(params, permute(x), t, y)) - permute(np.asarray(rope(params, x, t, y)))
  assert np.abs(diff).max() > 1e-3


def test_sincos_table():
  table = dit.sincos_2d_embedding(3, 8)
  assert table.shape == (9, 8)
  # Token (row 1, col 2): row half [sin(1 f), cos(1 f)], column half [sin(2 f), cos(2 f)].
  f = np.array([1.0, 1e-2])
  expected = np.concatenate([np.sin(f), np.cos(f), np.sin(2 * f), np.cos(2 * f)])
  np.testing.assert_allclose(table[5], expected, rtol=1e-6)


def test_flops_match_xla_cost_analysis():
  config = dit.DitConfig(
    input_size=8,
    in_channels=4,
    patch_size=1,
    width=128,
    depth=2,
    num_heads=2,
    num_classes=10,
    ffn="swiglu",
    rope=True,
    norm="rmsnorm",
  )
  batch = 2
  x, t, y = _inputs(config, batch=batch)
  model = dit.Dit(config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y, train=False))["params"]
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, train=False))
  cost = fwd.lower(params, x, t, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = batch * dit.dit_flops_per_example(config)
  print(f"DiT FLOPs: XLA {cost['flops']:.4g}, analytic {analytic:.4g}")
  assert abs(cost["flops"] / analytic - 1) < 0.15, (cost["flops"], analytic)
  assert dit.dit_flops_per_example(config, training=True) == 3 * dit.dit_flops_per_example(config)


def test_train_step_compiles_once_and_grads_flow(all_on):
  config = ALL_ON
  model = dit.Dit(config)
  params = all_on[0]
  traces = []

  @_jit
  def step(params, x, t, y, rng):
    traces.append(1)

    def loss_fn(p):
      v = model.apply({"params": p}, x, t, y, train=True, rngs={"dropout": rng})
      return jnp.mean(jnp.square(v))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, grads, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

  losses = []
  for i in range(3):
    xi, ti, yi = _inputs(config, batch=4, seed=10 + i)
    loss, grads, params = step(params, xi, ti, yi, jax.random.key(i))
    losses.append(float(loss))
  assert len(traces) == 1
  assert all(np.isfinite(losses))
  assert float(jnp.abs(grads["final_layer"]["linear"]["kernel"]).max()) > 0
  assert float(jnp.abs(grads["blocks_0"]["adaLN_modulation"]["kernel"]).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_output(all_on):
  config = ALL_ON
  params, x, t, y = all_on
  model16 = dit.Dit(config, dtype=jnp.bfloat16)
  out16 = _jit(lambda p: model16.apply({"params": p}, x, t, y, train=False))(params)
  out32 = _apply_fn(config)(params, x, t, y)
  assert out16.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  rel = np.abs(np.asarray(out16) - np.asarray(out32)).max() / np.abs(np.asarray(out32)).max()
  assert rel < 0.05, rel


def test_remat_gives_identical_gradients(all_on):
  params, x, t, y = all_on

  def grads(config):
    model = dit.Dit(config)
    loss = lambda p: jnp.mean(model.apply({"params": p}, x, t, y, train=False) ** 2)  # noqa: E731
    return _jit(jax.grad(loss))(params)

  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    grads(dataclasses.replace(ALL_ON, remat=True)),
    grads(ALL_ON),
  )


def test_xl1_param_count_without_allocation():
  counts = {}
  for lightning in (True, False):
    config = dit.DitConfig.from_variant("XL/1", in_channels=32, input_size=16, lightning=lightning)
    model = dit.Dit(config)
    x = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(
      lambda x, t, y, m=model: m.init(jax.random.key(0), x, t, y, train=False), x, t, y
    )
    counts[lightning] = _count(shapes["params"])
  print(f"XL/1 16x16x32 params: LightningDiT {counts[True]:,}, SiT {counts[False]:,}")
  assert counts == {True: 674_961_824, False: 674_984_480}
