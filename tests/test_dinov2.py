"""DINOv2 in Flax vs transformers' PyTorch Dinov2Model / Dinov2WithRegistersModel.

Tiny random models (width 32, depth 2, patch 14, a 5x5 position table), every parameter
randomised (layer scales, mask and register tokens included) so that each path carries signal.
Inputs at sizes that force the position table to be resized, square and not.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fae_jax.convert import dinov2 as convert
from fae_jax.models.dinov2 import Dinov2, Dinov2Config

WIDTH, DEPTH, HEADS, PATCH, IMAGE = 32, 2, 4, 14, 70  # position table 5x5
ATOL = 1e-4


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Replaces every parameter with a random value of a sensible scale."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("lambda1"):  # layer scale
        p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=gen))
      elif name.endswith("weight") and p.ndim == 1:  # LayerNorm scale
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      elif name.endswith("weight"):  # linear / conv: unit-variance outputs
        p.copy_(noise / math.sqrt(p[0].numel()))
      else:  # cls, mask and register tokens, position table
        p.copy_(noise)


def _hf_model(kind: str, seed: int = 0) -> torch.nn.Module:
  common = dict(
    hidden_size=WIDTH,
    num_hidden_layers=DEPTH,
    num_attention_heads=HEADS,
    image_size=IMAGE,
    patch_size=PATCH,
    layer_norm_eps=1e-6,
  )
  if kind == "registers":
    cfg = transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
    model = transformers.Dinov2WithRegistersModel(cfg)
  else:
    cfg = transformers.Dinov2Config(use_swiglu_ffn=kind == "swiglu", **common)
    model = transformers.Dinov2Model(cfg)
  _randomise(model, seed)
  return model.eval()


def _ours(model: torch.nn.Module, **overrides):
  """Converted params and our config with transformers' resize rule (size rule, no offset)."""
  registers = getattr(model.config, "num_register_tokens", 0)
  fields = dict(num_heads=HEADS, interpolate_offset=0.0, interpolate_antialias=registers > 0)
  fields.update(overrides)
  sd = model.state_dict()
  config = convert.infer_config(sd, **fields)
  return config, convert.convert_state_dict(sd, config)


def _hf_forward(model, pixels_nhwc: np.ndarray, **kwargs) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(
      torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True, **kwargs
    )
  hidden = [h.numpy() for h in out.hidden_states]  # embeddings, then each block's output
  return {"last": out.last_hidden_state.numpy(), "hidden": hidden}


def _normalise(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  x = x.astype(np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def _assert_close(name, ours, ref, atol=ATOL):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
  if not ours.size:
    return
  err = np.max(np.abs(ours - ref))
  assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def _apply(model: Dinov2, params, pixels, **kwargs):
  """Jitted forward: one compilation instead of op-by-op dispatch."""
  return jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, pixels)


def _compare(config, params, ref, out):
  r = 1 + config.num_registers
  _assert_close("cls", out["cls"], ref["last"][:, 0])
  _assert_close("registers", out["registers"], ref["last"][:, 1:r])
  _assert_close("patch", out["patch"], ref["last"][:, r:])
  _assert_close("prenorm", out["prenorm"], ref["hidden"][-1])
  _assert_close("patch_no_affine", out["patch_no_affine"], _normalise(ref["hidden"][-1][:, r:]))
  _assert_close("layers[0]", out["layers"][0], ref["hidden"][1])
  _assert_close("layers[-1]", out["layers"][-1], ref["hidden"][-1])


@pytest.mark.parametrize("kind", ["mlp", "swiglu", "registers"])
@pytest.mark.parametrize("hw", [(98, 98), (42, 28)], ids=["98x98", "42x28"])
def test_matches_transformers(kind, hw):
  hf = _hf_model(kind)
  config, params = _ours(hf)
  assert config.ffn == ("swiglu" if kind == "swiglu" else "mlp")
  assert config.num_registers == (4 if kind == "registers" else 0)
  pixels = np.random.default_rng(1).normal(size=(2, *hw, 3)).astype(np.float32)
  ref = _hf_forward(hf, pixels)
  model = Dinov2(config, matmul_precision="highest")
  out = _apply(model, params, jnp.asarray(pixels), return_layers=(0, -1))
  _compare(config, params, ref, out)
  n = (hw[0] // PATCH) * (hw[1] // PATCH)
  assert out["patch"].shape == (2, n, WIDTH)
  np.testing.assert_allclose(np.asarray(out["patch_no_affine"]).mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["patch_no_affine"]).std(-1), 1.0, atol=1e-3)


def test_native_resolution_and_masks():
  hf = _hf_model("mlp", seed=3)
  config, params = _ours(hf)
  rng = np.random.default_rng(2)
  pixels = rng.normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  masks = rng.random((2, (IMAGE // PATCH) ** 2)) < 0.5
  ref = _hf_forward(hf, pixels, bool_masked_pos=torch.from_numpy(masks))
  model = Dinov2(config)
  out = _apply(model, params, jnp.asarray(pixels), masks=jnp.asarray(masks))
  _compare(config, params, ref, {**out, "layers": {0: ref["hidden"][1], -1: out["prenorm"]}})
  unmasked = _apply(model, params, jnp.asarray(pixels))
  assert np.max(np.abs(np.asarray(unmasked["patch"] - out["patch"]))) > 1e-2  # masks matter


def _original_interpolate_pos_encoding(self, embeddings, height, width):
  """facebookresearch/dinov2's rule (scale factor with the 0.1 offset), for HF's embeddings."""
  pos = self.position_embeddings.float()
  m = int(math.sqrt(pos.shape[1] - 1))
  h0, w0 = height // PATCH, width // PATCH
  if (h0, w0) == (m, m):
    return pos
  grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(
    grid, scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m), mode="bicubic", antialias=False
  )
  assert tuple(grid.shape[-2:]) == (h0, w0)
  return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)


@pytest.mark.parametrize("hw", [(98, 84), (42, 28)], ids=["up", "down"])
def test_original_offset_rule(hw, monkeypatch):
  """Default config of a non-register checkpoint = the original 0.1-offset resize."""
  monkeypatch.setattr(
    transformers.models.dinov2.modeling_dinov2.Dinov2Embeddings,
    "interpolate_pos_encoding",
    _original_interpolate_pos_encoding,
  )
  hf = _hf_model("mlp", seed=4)
  sd = hf.state_dict()
  config = convert.infer_config(sd, num_heads=HEADS)
  assert (config.interpolate_offset, config.interpolate_antialias) == (0.1, False)
  params = convert.convert_state_dict(sd, config)
  pixels = np.random.default_rng(5).normal(size=(1, *hw, 3)).astype(np.float32)
  ref = _hf_forward(hf, pixels)
  out = _apply(Dinov2(config), params, jnp.asarray(pixels), return_layers=(0, -1))
  _compare(config, params, ref, out)
  # The two rules really differ here, so the test can tell them apart.
  size_rule = Dinov2(Dinov2Config(**{**config.to_dict(), "interpolate_offset": 0.0}))
  other = _apply(size_rule, params, jnp.asarray(pixels))
  assert np.max(np.abs(np.asarray(other["patch"] - out["patch"]))) > 1e-3


def test_bfloat16_close_to_float32():
  hf = _hf_model("registers", seed=6)
  config, params = _ours(hf)
  pixels = jnp.asarray(np.random.default_rng(7).normal(size=(2, 42, 56, 3)), jnp.float32)
  ref = _apply(Dinov2(config), params, pixels)
  model = Dinov2(config, dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, jax.random.key(0), pixels)
  dtypes = {x.dtype for x in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}  # params stay float32
  out = _apply(model, params, pixels)
  for key in ("cls", "registers", "patch", "patch_no_affine"):
    assert out[key].dtype == jnp.float32
    err = np.abs(np.asarray(out[key]) - np.asarray(ref[key]))
    assert err.max() < 0.08 and err.mean() < 0.01, (key, err.max(), err.mean())


def test_config_variants_and_round_trip():
  g = Dinov2Config.from_variant("g/14")
  assert (g.width, g.depth, g.num_heads, g.ffn, g.mlp_hidden) == (1536, 40, 24, "swiglu", 4096)
  assert (g.interpolate_offset, g.interpolate_antialias) == (0.1, False)
  s_reg = Dinov2Config.from_variant("S/14", num_registers=4)
  assert (s_reg.width, s_reg.depth, s_reg.num_heads, s_reg.mlp_hidden) == (384, 12, 6, 1536)
  assert (s_reg.interpolate_offset, s_reg.interpolate_antialias) == (0.0, True)
  for variant in ("B/14", "L/14"):
    c = Dinov2Config.from_variant(variant, pos_grid=16)
    assert c.width // c.num_heads == 64 and c.pos_grid == 16
  assert Dinov2Config.from_dict(json.loads(json.dumps(g.to_dict()))) == g
  with pytest.raises(ValueError, match="Unknown DINOv2 variant"):
    Dinov2Config.from_variant("H/14")
  with pytest.raises(ValueError, match="Unknown Dinov2Config keys"):
    Dinov2Config.from_dict({**g.to_dict(), "heads": 3})


def test_param_count_of_published_variants():
  """Parameter counts of the 518 px checkpoints (mask token included, as they ship it)."""
  counts = {}
  for variant in ("S/14", "g/14"):
    shapes = convert.expected_param_shapes(Dinov2Config.from_variant(variant))
    counts[variant] = sum(math.prod(s) for s in shapes.values())
  assert counts["S/14"] == 22_056_576
  assert counts["g/14"] == 1_136_480_768


def test_bad_inputs():
  config = Dinov2Config(width=WIDTH, depth=1, num_heads=HEADS, pos_grid=2)
  model = Dinov2(config)
  x = jnp.zeros((1, 28, 28, 3))
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="not a multiple of the patch size"):
    jax.eval_shape(model.apply, params, jnp.zeros((1, 30, 28, 3)))
  with pytest.raises(ValueError, match="out of range"):
    jax.eval_shape(functools.partial(model.apply, return_layers=(1,)), params, x)
  with pytest.raises(ValueError, match="masks must be"):
    jax.eval_shape(functools.partial(model.apply, masks=jnp.zeros((1, 3), bool)), params, x)
