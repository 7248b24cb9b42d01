"""Reading PyTorch weight files for every converter; torch is imported here only, lazily.

`load_pth(path)` reads a `.pth` state dict (local or any `etils.epath` URL such as gs://),
unwraps the usual containers (`model`, `state_dict`, `teacher`) and returns numpy arrays
(bfloat16 as float32, other dtypes kept). A file that exists but cannot be read raises
`CheckpointReadError` naming the file, its size, the reason and the fix.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from etils import epath

_CONTAINERS = ("model", "state_dict", "teacher")


class CheckpointReadError(ValueError):
  """A weights file that exists but cannot be read (truncated, corrupt, or another format)."""


def read_error(
  path: str | os.PathLike, fmt: str, error: Exception, what: str = "Checkpoint"
) -> CheckpointReadError:
  try:
    size = f"{epath.Path(path).stat().length:,} bytes"
  except Exception:  # noqa: BLE001  (the size is only a hint in the message)
    size = "size unknown"
  return CheckpointReadError(
    f"{what} {os.fspath(path)} ({size}) could not be read as {fmt}: "
    f"{type(error).__name__}: {error}. The file is truncated or corrupt, or not a {fmt} file: "
    "download it again (compare its sha256 with the published one) and rerun `convert`."
  )


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (or array-like) as numpy; bfloat16 becomes float32 (numpy has none)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def load_pth(
  path: str | os.PathLike, *, what: str = "Checkpoint", hint: str = ""
) -> dict[str, np.ndarray]:
  """The state dict in a `.pth` file as `{name: numpy array}`.

  `what` names the file in errors ("Encoder checkpoint"); `hint` says which file to pass
  instead when it holds something other than a state dict.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"Reading {path} needs PyTorch: pip install -e '.[convert]' (torch==2.13.0)."
    ) from e
  try:
    blob = epath.Path(path).read_bytes()
    obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (torch raises many kinds for a bad file)
    raise read_error(path, "a PyTorch state dict (.pth)", e, what) from e
  for key in _CONTAINERS:
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
    raise CheckpointReadError(
      f"{what} {os.fspath(path)} holds a {type(obj).__name__}, not a state dict of tensors "
      f"(nor one under {', '.join(repr(k) for k in _CONTAINERS)}). {hint}".rstrip()
    )
  return {k: to_numpy(v) for k, v in obj.items()}


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  """`{("a", "b"): x}` -> `{"a": {"b": x}}`: a converter's explicit map back into a Flax tree."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree
