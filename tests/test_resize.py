"""Parity of `fae_jax.models.resize` with `torch.nn.functional.interpolate(mode="bicubic")`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fae_jax.models import resize

# (in_size, (out_h, out_w)): DINOv2-like tables shrunk and grown, non-square, tiny, and the
# offset rule's "same size" case where the scale factor is not 1.
CASES = [
  (37, (16, 16)),
  (37, (8, 8)),
  (16, (37, 37)),
  (37, (16, 12)),
  (7, (5, 5)),
  (5, (7, 9)),
  (9, (9, 9)),
]
OFFSET = 0.1


def _offset_scale(in_size, out_hw):
  """DINOv2's scale-factor rule, computed as its code does."""
  return tuple(float(o + OFFSET) / in_size for o in out_hw)


def _torch_resize(x_nhwc, out_hw, *, scale_factor, antialias, dtype):
  """Reference: F.interpolate on NCHW, back to NHWC float64 numpy."""
  t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(dtype)
  kwargs = {"scale_factor": scale_factor} if scale_factor else {"size": out_hw}
  y = F.interpolate(t, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
  assert tuple(y.shape[-2:]) == tuple(out_hw)
  return y.double().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("rule", ["size", "offset"])
@pytest.mark.parametrize("in_size,out_hw", CASES)
def test_matches_torch(in_size, out_hw, rule, antialias):
  scale_factor = _offset_scale(in_size, out_hw) if rule == "offset" else None
  rng = np.random.default_rng(in_size * 100 + out_hw[1])
  # Values of order 1, exactly representable in float32 so both torch runs see the same table.
  x = rng.uniform(-1.0, 1.0, (2, in_size, in_size, 3)).astype(np.float32).astype(np.float64)
  ref64 = _torch_resize(
    x, out_hw, scale_factor=scale_factor, antialias=antialias, dtype=torch.float64
  )
  ref32 = _torch_resize(
    x, out_hw, scale_factor=scale_factor, antialias=antialias, dtype=torch.float32
  )

  # Float64 matrices in numpy: the same arithmetic as torch's float64 kernel.
  sh, sw = scale_factor or (None, None)
  w_h = resize.bicubic_matrix(in_size, out_hw[0], scale_factor=sh, antialias=antialias)
  w_w = resize.bicubic_matrix(in_size, out_hw[1], scale_factor=sw, antialias=antialias)
  assert w_h.shape == (out_hw[0], in_size) and w_h.dtype == np.float64
  np.testing.assert_allclose(w_h.sum(axis=1), 1.0, atol=1e-12)
  ours = np.einsum("oh,pw,nhwc->nopc", w_h, w_w, x)
  np.testing.assert_allclose(ours, ref64, rtol=0, atol=1e-12)

  # JAX in float32; by default it reproduces torch's float32 weights, on request the exact ones.
  x32 = jnp.asarray(x, jnp.float32)
  y32 = resize.resize_bicubic(x32, out_hw, scale_factor=scale_factor, antialias=antialias)
  assert y32.shape == (2, *out_hw, 3) and y32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y32), ref32, rtol=0, atol=1e-6)
  y64w = resize.resize_bicubic(
    x32, out_hw, scale_factor=scale_factor, antialias=antialias, torch_dtype="float64"
  )
  np.testing.assert_allclose(np.asarray(y64w), ref64, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
  "in_hw,out_hw,antialias",
  [((28, 28), (112, 112), False), ((28, 28), (112, 112), True), ((256, 256), (112, 112), True)],
)
def test_image_resize_matches_torch(in_hw, out_hw, antialias):
  # Encoder-input resizes ([-1, 1] images, channels last); torchvision's resize(antialias=True)
  # on float tensors is this F.interpolate call. Torch float32 is itself ~1e-5 off the float64
  # result at 256 px, so each precision is compared with its own reference.
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.0, 1.0, (2, *in_hw, 3)).astype(np.float32)
  y = resize.resize_bicubic(jnp.asarray(x), out_hw, antialias=antialias)
  ref32 = _torch_resize(x, out_hw, scale_factor=None, antialias=antialias, dtype=torch.float32)
  np.testing.assert_allclose(np.asarray(y), ref32, rtol=0, atol=1e-6)
  y64w = resize.resize_bicubic(jnp.asarray(x), out_hw, antialias=antialias, torch_dtype="float64")
  ref64 = _torch_resize(x, out_hw, scale_factor=None, antialias=antialias, dtype=torch.float64)
  np.testing.assert_allclose(np.asarray(y64w), ref64, rtol=0, atol=1e-6)


def _hf_interpolate(module_name, class_name, config_name, table, out_hw, patch):
  """Runs transformers' own `interpolate_pos_encoding` on `table` [M, M, D]."""
  import importlib

  import transformers

  m, _, d = table.shape
  config = getattr(transformers, config_name)(
    hidden_size=d, patch_size=patch, image_size=m * patch, num_hidden_layers=1
  )
  module = getattr(importlib.import_module(module_name), class_name)(config)
  cls = np.zeros((1, 1, d), np.float32)
  with torch.no_grad():
    module.position_embeddings.copy_(
      torch.from_numpy(np.concatenate([cls, table.reshape(1, -1, d)], 1))
    )
    tokens = torch.zeros(1, 1 + out_hw[0] * out_hw[1], d)
    out = module.interpolate_pos_encoding(tokens, out_hw[0] * patch, out_hw[1] * patch)
  return out[0, 1:].numpy().reshape(*out_hw, d)


@pytest.mark.parametrize("out_hw", [(4, 4), (8, 6)])
@pytest.mark.parametrize(
  "hf_names,antialias",
  [
    (("transformers.models.dinov2.modeling_dinov2", "Dinov2Embeddings", "Dinov2Config"), False),
    (
      (
        "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
        "Dinov2WithRegistersEmbeddings",
        "Dinov2WithRegistersConfig",
      ),
      True,
    ),
  ],
  ids=["dinov2", "dinov2_with_registers"],
)
def test_pos_grid_matches_transformers(hf_names, antialias, out_hw):
  # transformers 5.x: size rule, antialias only for the register models.
  rng = np.random.default_rng(1)
  table = rng.uniform(-1.0, 1.0, (6, 6, 8)).astype(np.float32)
  ref = _hf_interpolate(*hf_names, table, out_hw, patch=2)
  ours = resize.resize_pos_grid(
    jnp.asarray(table), out_hw, interpolate_offset=0.0, antialias=antialias
  )
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("antialias", [False, True])
def test_pos_grid_offset_rule_matches_dinov2(antialias):
  # facebookresearch/dinov2: scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M) on a float32 table.
  rng = np.random.default_rng(2)
  table = rng.uniform(-1.0, 1.0, (37, 37, 4)).astype(np.float32)
  out_hw = (16, 12)
  scale = (float(out_hw[0] + 0.1) / 37, float(out_hw[1] + 0.1) / 37)
  ref = _torch_resize(
    table[None], out_hw, scale_factor=scale, antialias=antialias, dtype=torch.float32
  )[0]
  ours = resize.resize_pos_grid(
    jnp.asarray(table), out_hw, interpolate_offset=OFFSET, antialias=antialias
  )
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-6)
  # The offset rule is not the size rule: the 1/scale mapping moves the samples.
  size_rule = resize.resize_pos_grid(
    jnp.asarray(table), out_hw, interpolate_offset=0.0, antialias=antialias
  )
  assert np.abs(np.asarray(size_rule) - ref).max() > 1e-3


@pytest.mark.parametrize("offset,antialias", [(0.0, False), (0.0, True), (0.1, False), (0.1, True)])
def test_pos_grid_unchanged_when_size_matches(offset, antialias):
  grid = jnp.arange(5 * 5 * 3, dtype=jnp.float32).reshape(5, 5, 3)
  assert (
    resize.resize_pos_grid(grid, (5, 5), interpolate_offset=offset, antialias=antialias) is grid
  )


def test_plain_bicubic_is_not_jax_image_resize():
  # Why this module exists: jax.image.resize uses a = -0.5 and another border rule.
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (7, 7, 2)), jnp.float32)
  ours = resize.resize_bicubic(x, (16, 16))
  theirs = jax.image.resize(x, (16, 16, 2), "bicubic")
  assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() > 1e-3


def test_jit_grad_batch_dims_and_dtype():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(-1, 1, (2, 3, 10, 9, 4)), jnp.float32)
  fn = jax.jit(resize.resize_bicubic, static_argnames=("out_hw", "antialias"))
  y = fn(x, out_hw=(5, 13), antialias=True)
  assert y.shape == (2, 3, 5, 13, 4)
  np.testing.assert_allclose(y, resize.resize_bicubic(x, (5, 13), antialias=True), atol=1e-6)

  # The map is linear, so its VJP is the transposed matrices applied to the cotangent.
  w_h = resize.bicubic_matrix(10, 5, antialias=True, torch_dtype="float32")
  w_w = resize.bicubic_matrix(9, 13, antialias=True, torch_dtype="float32")
  g = jnp.asarray(rng.uniform(-1, 1, y.shape), jnp.float32)
  _, vjp = jax.vjp(lambda v: resize.resize_bicubic(v, (5, 13), antialias=True), x)
  expected = np.einsum("oh,pw,...opc->...hwc", w_h, w_w, np.asarray(g, np.float64))
  np.testing.assert_allclose(vjp(g)[0], expected, atol=1e-5)

  yb = resize.resize_bicubic(x.astype(jnp.bfloat16), (5, 13))
  assert yb.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(yb, np.float32), resize.resize_bicubic(x, (5, 13)), atol=0.05
  )


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="floor"):
    resize.bicubic_matrix(37, 16, scale_factor=0.5)  # PyTorch would produce 18, not 16
  with pytest.raises(ValueError, match="torch_dtype"):
    resize.bicubic_matrix(4, 2, torch_dtype="float16")
  with pytest.raises(TypeError, match="floating-point"):
    resize.resize_bicubic(jnp.zeros((4, 4, 3), jnp.uint8), (2, 2))
