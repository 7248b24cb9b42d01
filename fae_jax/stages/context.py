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
  def upstream(self) -> epath.Path:
    """Where the shared upstream outputs (encoder, feature cache) live.

    `config.upstream_workdir` lets many runs (sweep points) share one converted encoder and one
    feature cache; empty means this run's own workdir.
    """
    up = self.config.get("upstream_workdir") or ""
    return epath.Path(up) if up else self.workdir

  def input_root(self, stage: str) -> epath.Path:
    """The workdir holding `stage`'s outputs as this run's input.

    The run's own workdir when it runs `stage` itself, has no upstream, or already holds
    `<stage>/`; otherwise `config.upstream_workdir`: a sweep point or a `:stage=<name>` run reads
    the outputs of the stages it does not run from the shared run.
    """
    if stage in tuple(self.config.stages) or self.upstream == self.workdir:
      return self.workdir
    if (self.workdir / stage).exists():
      return self.workdir
    return self.upstream

  @property
  def encoder_dir(self) -> epath.Path:
    return self.upstream / "encoder"

  @property
  def features_dir(self) -> epath.Path:
    return self.upstream / "features"
