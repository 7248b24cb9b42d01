"""PyTorch LPIPS-VGG weights -> Flax params of `fae_jax.models.lpips.Lpips`.

Two sources, both read with explicit name maps:
  * the VGG16 trunk: torchvision's ImageNet `vgg16` state dict (`vgg16-397923af.pth`), keys
    `features.{i}.weight|bias` for the 13 convolutions (i in `VGG16_CONV_INDICES`). Its
    classifier (`classifier.*`) is not part of LPIPS and is dropped (`VGG_IGNORED_PREFIXES`);
  * the LPIPS head: the `lpips` package's `weights/v0.1/vgg.pth`, keys `lin{k}.model.1.weight`
    (`[1, C_k, 1, 1]`, the 1x1 convolution after the dropout of `NetLinLayer`).

Transforms: conv `[out, in, kh, kw] -> [kh, kw, in, out]`; bias unchanged. Conversion fails
with one message listing every unused source key, every missing key, every shape mismatch
(both shapes), every model parameter left unfilled, and negative `lin` weights.

On disk (`convert_lpips_files`): `DIR/params/` (Orbax, float32) and `DIR/lpips.json`
(`{"model": "lpips_vgg", "version": "0.1", "source": {...sha256...}, "num_params": ...}`),
written by `fae_jax.params_store` (`lpips.json` is the commit marker, written last; nothing is
renamed, so it is atomic on `gs://` too). `load_lpips(DIR)` reads it back
without torch.

This module imports torch only inside `convert_lpips_files` (to read `.pth` files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fae_jax import params_store
from fae_jax.convert import torch_files
from fae_jax.models.lpips import VGG16_STAGE_CHANNELS, Lpips, conv_channels

META_NAME = "lpips.json"
VGG_IGNORED_PREFIXES = ("classifier.",)

ParamTree = dict[str, Any]


def _to_numpy(value: Any) -> np.ndarray:
  return np.asarray(torch_files.to_numpy(value), np.float32)


def vgg_param_map() -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """`(torch key, flax path, torch shape)` for every VGG16 trunk tensor LPIPS uses."""
  rules = []
  for i, (cin, cout) in conv_channels().items():
    rules.append((f"features.{i}.weight", ("net", f"features_{i}", "kernel"), (cout, cin, 3, 3)))
    rules.append((f"features.{i}.bias", ("net", f"features_{i}", "bias"), (cout,)))
  return rules


def lin_param_map() -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """`(torch key, flax path, torch shape)` of the five LPIPS `lin` layers."""
  return [
    (f"lin{k}.model.1.weight", (f"lin{k}", "kernel"), (1, c, 1, 1))
    for k, c in enumerate(VGG16_STAGE_CHANNELS)
  ]


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def expected_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape of `Lpips`, from `jax.eval_shape` (nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  shapes = jax.eval_shape(Lpips().init, jax.random.key(0), x, x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_lpips(
  vgg_state_dict: Mapping[str, Any],
  lin_state_dict: Mapping[str, Any],
  *,
  vgg_ignored_prefixes: Sequence[str] = VGG_IGNORED_PREFIXES,
) -> ParamTree:
  """Converts torchvision VGG16 + LPIPS `lin` state dicts to `Lpips` params.

  Args:
    vgg_state_dict: torchvision `vgg16` state dict (`features.N.weight/bias`, ...).
    lin_state_dict: LPIPS head state dict (`lin0.model.1.weight` .. `lin4.model.1.weight`).
    vgg_ignored_prefixes: VGG keys starting with these are dropped (the classifier).

  Returns:
    `{'net': {'features_0': {'kernel', 'bias'}, ...}, 'lin0': {'kernel'}, ...}` of float32
    numpy arrays, for `Lpips().apply({'params': tree}, x, y)`.

  Raises:
    ValueError: naming every unused key, missing key, shape mismatch, unfilled parameter and
      negative lin weight.
  """
  vgg = {k: v for k, v in vgg_state_dict.items() if not k.startswith(tuple(vgg_ignored_prefixes))}
  problems: dict[str, list[str]] = {
    "unused checkpoint keys": [],
    "missing checkpoint keys": [],
    "shape mismatches": [],
    "model parameters not filled by the map": [],
    "negative lin weights (LPIPS lin layers are non-negative)": [],
  }
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for source, sd, rules in (
    ("vgg", vgg, vgg_param_map()),
    ("lin", dict(lin_state_dict), lin_param_map()),
  ):
    used = set()
    for key, target, shape in rules:
      used.add(key)
      if key not in sd:
        problems["missing checkpoint keys"].append(f"{source}: {key} (for {'/'.join(target)})")
        continue
      value = _to_numpy(sd[key])
      if tuple(value.shape) != shape:
        problems["shape mismatches"].append(
          f"{source}: {key}: checkpoint {tuple(value.shape)}, model expects {shape}"
        )
        continue
      if source == "lin" and np.any(value < 0):
        problems["negative lin weights (LPIPS lin layers are non-negative)"].append(
          f"{key}: min {float(value.min()):.3g}"
        )
      flat[target] = _conv_kernel(value) if value.ndim == 4 else value
    problems["unused checkpoint keys"] += [f"{source}: {k}" for k in sorted(set(sd) - used)]

  expected = expected_param_shapes()
  targets = {t for _, t, _ in vgg_param_map() + lin_param_map()}
  problems["model parameters not filled by the map"] = sorted(
    "/".join(t) for t in set(expected) - targets
  )
  problems["map targets the model does not have"] = sorted(
    "/".join(t) for t in targets - set(expected)
  )
  for target, value in flat.items():
    if target in expected and expected[target] != tuple(value.shape):
      problems["shape mismatches"].append(
        f"{'/'.join(target)}: converted {tuple(value.shape)}, model {expected[target]}"
      )
  report = [f"{len(v)} {title}:\n  " + "\n  ".join(v) for title, v in problems.items() if v]
  if report:
    raise ValueError("Cannot convert the LPIPS-VGG state dicts:\n" + "\n".join(report))

  return torch_files.unflatten(flat)


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


def _sha256(path: str | os.PathLike) -> str:
  from fae_jax.encoder_checkpoint import sha256_file

  return sha256_file(path)


def _load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  return torch_files.load_pth(path, what="LPIPS weights")


def save_lpips(directory: str | os.PathLike, params: Any, source: dict[str, Any]) -> dict[str, Any]:
  """Writes `params/` + `lpips.json` atomically (`fae_jax.params_store`); returns the metadata."""
  meta = {"model": "lpips_vgg", "version": "0.1", "source": dict(source)}
  return params_store.save_params(directory, params, meta, META_NAME)


def convert_lpips_files(
  vgg_path: str | os.PathLike, lin_path: str | os.PathLike, out_dir: str | os.PathLike
) -> dict[str, Any]:
  """`python -m fae_jax.convert lpips --vgg=vgg16.pth --lin=vgg.pth --out=DIR`.

  Args:
    vgg_path: torchvision `vgg16` ImageNet weights (`vgg16-397923af.pth`).
    lin_path: the `lpips` package's `weights/v0.1/vgg.pth`.
    out_dir: output directory; must not exist.

  Returns:
    The metadata written to `out_dir/lpips.json`.
  """
  for label, path in (("--vgg", vgg_path), ("--lin", lin_path)):
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"{label}={path} does not exist. LPIPS-VGG needs torchvision's vgg16-397923af.pth and "
        "the lpips package's weights/v0.1/vgg.pth (pip download lpips; it is inside the wheel)."
      )
  params = convert_lpips(_load_pth(vgg_path), _load_pth(lin_path))
  source = {
    "vgg": {"path": os.fspath(vgg_path), "sha256": _sha256(vgg_path)},
    "lin": {"path": os.fspath(lin_path), "sha256": _sha256(lin_path)},
  }
  return save_lpips(out_dir, params, source)


def load_lpips(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """Returns `(params, metadata)` of a converted LPIPS (numpy float32 leaves)."""
  meta = params_store.load_meta(
    directory,
    META_NAME,
    "Run `python -m fae_jax.convert lpips --vgg=vgg16-397923af.pth --lin=vgg.pth --out=DIR`.",
  )
  return params_store.load_params(directory), meta
