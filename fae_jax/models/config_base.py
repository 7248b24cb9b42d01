"""`JsonConfig`: the to/from-JSON contract shared by every frozen dataclass model config."""

from __future__ import annotations

import dataclasses
from typing import Any


class JsonConfig:
  """Mixin of the frozen dataclass model configs: a JSON-able `to_dict` and a strict `from_dict`.

  `to_dict` writes tuples as lists (JSON has no tuples); `from_dict` rejects unknown keys, so a
  model JSON from another version fails loudly instead of silently dropping a field.
  """

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}.")
    return cls(**d)


class LatentGridConfig(JsonConfig):
  """Derived sizes of a class-conditional generator over a square latent grid.

  Needs the fields `width`, `num_heads`, `input_size`, `patch_size` and `num_classes`.
  """

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid_size(self) -> int:
    """Tokens per side, `input_size / patch_size`."""
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size**2

  @property
  def null_class(self) -> int:
    """The label of the unconditional (dropped) class, one past the real ones."""
    return self.num_classes
