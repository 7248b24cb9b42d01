"""Bad encoder weights: every error names the file or key, the reason and the fix, and a good
conversion already on disk is never damaged (issue 15). Also: Hugging Face checkpoints as users
have them (a save_pretrained directory, or model.safetensors with config.json beside it) convert
for any width and depth, with the architecture read from config.json."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from fae_jax import encoder_checkpoint
from fae_jax.convert import encoder as convert_encoder_lib
from fae_jax.models.dinov2 import Dinov2

# A width no published DINOv2 has (heads cannot be guessed from shapes), non-default eps.
HF = dict(
  hidden_size=48,
  num_hidden_layers=2,
  num_attention_heads=3,
  image_size=42,
  patch_size=14,
  layer_norm_eps=1e-5,
  layerscale_value=0.5,
)


def _hf_model(registers: bool = False) -> torch.nn.Module:
  if registers:
    model = transformers.Dinov2WithRegistersModel(
      transformers.Dinov2WithRegistersConfig(num_register_tokens=2, use_swiglu_ffn=True, **HF)
    )
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**HF))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf") / "dinov2-custom"
  _hf_model().save_pretrained(directory)
  return directory


@pytest.fixture
def good_export(tmp_path, hf_dir):
  """A good conversion already on disk, and its files' bytes, to check nothing damages it."""
  out = tmp_path / "encoder"
  convert_encoder_lib.convert_encoder(str(hf_dir), out)
  snapshot = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
  return out, snapshot


def _assert_untouched(export):
  out, snapshot = export
  now = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
  assert now == snapshot
  encoder_checkpoint.load_metadata(out)  # still loads


def _convert_fails(src, out, error, *phrases, **kwargs):
  with pytest.raises(error) as e:
    convert_encoder_lib.convert_encoder(os.fspath(src), out, **kwargs)
  message = str(e.value)
  for phrase in phrases:
    assert phrase in message, (phrase, message)
  assert not os.path.exists(out), "a failed conversion left an output directory"
  assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p], "temp files left"
  return message


@pytest.mark.parametrize("form", ["directory", "safetensors_with_config"])
def test_hf_checkpoint_any_width_converts_with_config_json(hf_dir, tmp_path, form):
  hf = _hf_model()
  src = hf_dir if form == "directory" else hf_dir / "model.safetensors"
  out = tmp_path / "enc"
  meta = convert_encoder_lib.convert_encoder(os.fspath(src), out)
  assert meta["source"]["config_json"].endswith("config.json")
  cfg = meta["config"]
  assert (cfg["width"], cfg["depth"], cfg["num_heads"]) == (48, 2, 3)
  assert cfg["layer_norm_eps"] == 1e-5 and cfg["layerscale_init"] == 0.5 and cfg["pos_grid"] == 3
  params, config, _ = encoder_checkpoint.load_encoder(out)
  # Parity with transformers at the native resolution (no position-table resize involved).
  pixels = np.random.default_rng(0).normal(size=(2, 42, 42, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  ours = jax.jit(Dinov2(config).apply)({"params": params}, pixels)
  np.testing.assert_allclose(np.asarray(ours["patch"]), ref[:, 1:], atol=2e-4)


def test_hf_registers_swiglu_config_json(tmp_path):
  model = _hf_model(registers=True)
  model.save_pretrained(tmp_path / "reg")
  meta = convert_encoder_lib.convert_encoder(os.fspath(tmp_path / "reg"), tmp_path / "enc")
  assert meta["config"]["num_registers"] == 2 and meta["config"]["ffn"] == "swiglu"


def test_missing_file(tmp_path, good_export):
  _convert_fails(
    tmp_path / "nope.pth", tmp_path / "out", FileNotFoundError, "nope.pth", "does not exist",
    "--config.encoder.source",
  )  # fmt: skip
  _assert_untouched(good_export)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "onnx"])
def test_truncated_or_corrupt_weights(tmp_path, hf_dir, good_export, fmt):
  weights = (hf_dir / "model.safetensors").read_bytes()
  if fmt == "safetensors":
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(weights[: len(weights) // 2])  # truncated: the header promises more
  elif fmt == "pth":
    state = {k: torch.from_numpy(v) for k, v in load_file(hf_dir / "model.safetensors").items()}
    torch.save(state, tmp_path / "full.pth")
    bad = tmp_path / "model.pth"
    bad.write_bytes((tmp_path / "full.pth").read_bytes()[:1000])
  else:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
  _convert_fails(
    bad, tmp_path / "out", ValueError, os.fspath(bad), "could not be read", "corrupt",
    "download it again",
  )  # fmt: skip
  _assert_untouched(good_export)


def test_pth_that_is_not_a_state_dict(tmp_path, good_export):
  bad = tmp_path / "list.pth"
  torch.save([torch.zeros(2)], bad)
  _convert_fails(bad, tmp_path / "out", ValueError, "list.pth", "not a state dict", "backbone")
  _assert_untouched(good_export)


@pytest.mark.parametrize("edit", ["missing", "extra", "shape"])
def test_state_dict_key_errors_name_the_key(tmp_path, hf_dir, good_export, edit):
  state = load_file(hf_dir / "model.safetensors")
  key = "encoder.layer.1.mlp.fc2.bias"
  if edit == "missing":
    del state[key]
  elif edit == "extra":
    state["head.weight"] = np.zeros((3, 3), np.float32)
    key = "head.weight"
  else:
    state[key] = np.zeros((47,), np.float32)
  bad_dir = tmp_path / "edited"
  bad_dir.mkdir()
  save_file(state, bad_dir / "model.safetensors")
  (bad_dir / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
  message = _convert_fails(bad_dir, tmp_path / "out", ValueError, key)
  if edit == "shape":
    assert "(47,)" in message and "(48,)" in message
  _assert_untouched(good_export)


def test_variant_mismatch(tmp_path, hf_dir, good_export):
  _convert_fails(
    hf_dir, tmp_path / "out", ValueError, "variant='S/14'", "width 384", "width 48",
    "fix the variant or the source", variant="S/14",
  )  # fmt: skip
  _assert_untouched(good_export)


def test_directory_without_weights_and_foreign_config(tmp_path, hf_dir, good_export):
  empty = tmp_path / "empty_model"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  _convert_fails(
    empty, tmp_path / "out", FileNotFoundError, "no model.safetensors", "save_pretrained"
  )
  other = tmp_path / "vit"
  other.mkdir()
  (other / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
  (other / "config.json").write_text('{"model_type": "vit"}')
  _convert_fails(other, tmp_path / "out", ValueError, "config.json", "'vit'", "not a DINOv2")
  _assert_untouched(good_export)
