"""What every stage receives: the config, the workdir and the device mesh."""

from __future__ import annotations

import dataclasses

import ml_collections
from etils import epath
from jax.sharding import Mesh


@dataclasses.dataclass
class StageContext:
  config: ml_collections.ConfigDict
  workdir: epath.Path
  mesh: Mesh

  def stage_dir(self, name: str) -> epath.Path:
    return self.workdir / name

  @property
  def encoder_dir(self) -> epath.Path:
    return self.workdir / "encoder"
