"""PyTorch FID Inception-v3 weights -> Flax params of `fae_jax.models.inception.FIDInceptionV3`.

Accepted files (both the TF `inception-2015-12-05` graph converted to PyTorch, same key layout):
  * `pt_inception-2015-12-05-6726825d.pth`, which pytorch-fid downloads;
  * `weights-inception-2015-12-05-6726825d.pth`, which torch-fidelity downloads.
Keys: `{module}.conv.weight` and `{module}.bn.weight|bias|running_mean|running_var` for every
`BasicConv2d` (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, ...), and `fc.weight` `[1008, 2048]`,
`fc.bias` `[1008]`. BatchNorm's `num_batches_tracked` may be present or absent (it is a training
counter; dropped).

The map (`param_map`) is explicit: one rule per Flax parameter, from the model's own parameter
tree (`jax.eval_shape`, nothing computed), whose names mirror the PyTorch modules:
  conv   `[out, in, kh, kw]` -> `{module}/conv/kernel` `[kh, kw, in, out]`
  bn     `weight, bias, running_mean, running_var` -> `{module}/bn/scale, bias, mean, var`
  fc     `weight [1008, 2048]` -> `fc/kernel [2048, 1008]`; `bias` unchanged.
Conversion fails with one message listing every unused key, missing key and shape mismatch.

On disk (`convert_inception_file`): `DIR/params/` (Orbax, float32) and `DIR/inception.json`
(`{"model": "fid_inception_v3", "graph": "inception-2015-12-05", "source": {path, sha256},
"num_params": ...}`), through `fae_jax.params_store` (written under a temporary name, renamed
when complete). `load_inception(DIR)` reads it back without torch.

torch is imported only inside `torch_files.load_pth`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fae_jax import params_store
from fae_jax.convert import torch_files
from fae_jax.models.inception import INPUT_SIZE, FIDInceptionV3

META_NAME = "inception.json"
MODEL_NAME = "fid_inception_v3"
WEIGHT_FILES = (
  "pt_inception-2015-12-05-6726825d.pth (pytorch-fid)",
  "weights-inception-2015-12-05-6726825d.pth (torch-fidelity)",
)
_CONVERT_HINT = (
  "Run `python -m fae_jax.convert inception --src=pt_inception-2015-12-05-6726825d.pth "
  "--out=DIR` (see the README's FID section for the weights file)."
)

ParamTree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """One Flax parameter: its PyTorch key, the PyTorch shape and the layout transform."""

  torch_key: str
  target: tuple[str, ...]
  torch_shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray]


def _copy(x: np.ndarray) -> np.ndarray:
  return x


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """`[out, in, kh, kw]` -> HWIO `[kh, kw, in, out]`."""
  return np.transpose(w, (2, 3, 1, 0))


def _linear_kernel(w: np.ndarray) -> np.ndarray:
  """`[out, in]` -> `[in, out]`."""
  return np.transpose(w)


# Flax leaf (module kind, param) -> (PyTorch leaf, transform, torch shape from the Flax shape).
_LEAF_RULES: dict[tuple[str, str], tuple[str, Callable, Callable]] = {
  ("conv", "kernel"): ("weight", _conv_kernel, lambda s: (s[3], s[2], s[0], s[1])),
  ("bn", "scale"): ("weight", _copy, tuple),
  ("bn", "bias"): ("bias", _copy, tuple),
  ("bn", "mean"): ("running_mean", _copy, tuple),
  ("bn", "var"): ("running_var", _copy, tuple),
  ("fc", "kernel"): ("weight", _linear_kernel, lambda s: (s[1], s[0])),
  ("fc", "bias"): ("bias", _copy, tuple),
}


def expected_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax param path -> shape of `FIDInceptionV3`, from `jax.eval_shape` (nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  model = FIDInceptionV3(resize_input=False)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def param_map() -> list[ParamRule]:
  """Every parameter of `FIDInceptionV3` with its PyTorch key, PyTorch shape and transform."""
  rules = []
  for target, shape in sorted(expected_param_shapes().items()):
    leaf_rule = _LEAF_RULES.get(target[-2:])
    if leaf_rule is None:
      raise AssertionError(f"No conversion rule for the Flax parameter {'/'.join(target)}.")
    torch_leaf, transform, torch_shape = leaf_rule
    key = ".".join((*target[:-1], torch_leaf))
    rules.append(ParamRule(key, target, tuple(torch_shape(shape)), transform))
  return rules


def optional_keys() -> set[str]:
  """Keys a checkpoint may hold that carry nothing for inference: BatchNorm's step counters."""
  return {
    ".".join((*r.target[:-1], "num_batches_tracked"))
    for r in param_map()
    if r.target[-2:] == ("bn", "scale")
  }


def convert_inception(state_dict: Mapping[str, Any]) -> ParamTree:
  """Converts a pytorch-fid / torch-fidelity FID Inception state dict to `FIDInceptionV3` params.

  Args:
    state_dict: `{torch key: tensor or array}` in the layout of the module docstring.

  Returns:
    The nested params tree (`{'Conv2d_1a_3x3': {'conv': {'kernel': ...}, 'bn': {...}}, ...}`)
    of float32 numpy arrays, for `FIDInceptionV3().apply({'params': tree}, images)`.

  Raises:
    ValueError: naming every unused key, every missing key and every shape mismatch.
  """
  rules = param_map()
  problems: dict[str, list[str]] = {
    "unused checkpoint keys": [],
    "missing checkpoint keys": [],
    "shape mismatches": [],
  }
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for rule in rules:
    if rule.torch_key not in state_dict:
      problems["missing checkpoint keys"].append(f"{rule.torch_key} {rule.torch_shape}")
      continue
    value = torch_files.to_numpy(state_dict[rule.torch_key])
    if tuple(value.shape) != rule.torch_shape:
      problems["shape mismatches"].append(
        f"{rule.torch_key}: checkpoint {tuple(value.shape)}, model expects {rule.torch_shape}"
      )
      continue
    flat[rule.target] = np.asarray(rule.transform(value.astype(np.float32)))
  known = {r.torch_key for r in rules} | optional_keys()
  problems["unused checkpoint keys"] = sorted(set(state_dict) - known)
  report = [f"{len(v)} {title}:\n  " + "\n  ".join(v) for title, v in problems.items() if v]
  if report:
    raise ValueError(
      "Cannot convert the FID Inception state dict (expected the layout of "
      f"{' or '.join(WEIGHT_FILES)}):\n" + "\n".join(report)
    )
  return torch_files.unflatten(flat)


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


def convert_inception_file(src: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
  """`python -m fae_jax.convert inception --src=FILE --out=DIR`.

  Args:
    src: the `.pth` weights (pytorch-fid's or torch-fidelity's file).
    out_dir: output directory; must not exist.

  Returns:
    The metadata written to `out_dir/inception.json`.
  """
  if not os.path.exists(src):
    raise FileNotFoundError(
      f"--src={src} does not exist. The FID Inception weights are {' or '.join(WEIGHT_FILES)}; "
      "see the README's FID section for where to get them."
    )
  state_dict = torch_files.load_pth(
    src, what="Inception weights", hint=f"Pass {' or '.join(WEIGHT_FILES)}."
  )
  params = convert_inception(state_dict)
  from fae_jax.encoder_checkpoint import sha256_file

  meta = {
    "model": MODEL_NAME,
    "graph": "inception-2015-12-05",
    "source": {
      "path": os.fspath(src),
      "sha256": sha256_file(src),
      "num_batches_tracked": any(k.endswith("num_batches_tracked") for k in state_dict),
    },
  }
  return params_store.save_params(out_dir, params, meta, META_NAME)


def load_inception(directory: str | os.PathLike, shardings: Any | None = None):
  """Returns `(params, metadata)` of a converted FID Inception (float32 leaves).

  Args:
    directory: written by `convert_inception_file`.
    shardings: optional pytree of shardings matching the params (e.g. all replicated).
  """
  meta = params_store.load_meta(directory, META_NAME, _CONVERT_HINT)
  if meta.get("model") != MODEL_NAME:
    raise ValueError(
      f"{directory} holds a {meta.get('model')!r} export, not {MODEL_NAME!r}. {_CONVERT_HINT}"
    )
  return params_store.load_params(directory, shardings), meta
