"""The artifact layer: where every stage's exports live in a workdir, and how to load them.

Stages are peers: a stage reads an earlier stage's outputs through this module (and the caches
through `fae_jax.data.feature_cache`), never by importing that stage. Layout of a workdir:

  encoder/                  the converted frozen encoder (`fae_jax.encoder_checkpoint`)
  fae/export/               FAE weights            model.json: FaeConfig, step, encoder fingerprint
  pixel/export/             final pixel decoder    model.json: PixelDecoderConfig, phase, image
  pixel/export_noisy/       phase-`noisy` decoder    size, encoder, dtypes, noise[, fae]
  diffusion/export/         DiT weights            model.json: DitConfig, latent_stats, time_shift
  flow/export/              TarFlow weights        model.json: TarFlowConfig, latent_stats

Every export is a `fae_jax.params_store` directory (Orbax params + `model.json`); `model.json`
is its commit marker, written last, so a reader sees a complete export or none, on local disk and
on `gs://` (nothing is renamed). Saving is collective: every process calls it.

  load_export(kind, directory) -> (params, model config, meta)     kind in EXPORT_KINDS
  load_frozen_encoder(directory, config) -> (params, EncoderSpec, meta)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from etils import epath

from fae_jax import encoder_checkpoint, multihost, params_store
from fae_jax.models import dit as dit_model
from fae_jax.models import fae as fae_model
from fae_jax.models import pixel_decoder as pd
from fae_jax.models import tarflow as tarflow_model
from fae_jax.models.dinov2 import Dinov2Config
from fae_jax.models.encoder import EncoderSpec

ENCODER = "encoder"
EXPORT = "export"
EXPORT_META = "model.json"
PIXEL_EXPORT_NOISY = "export_noisy"


@dataclasses.dataclass(frozen=True)
class _Kind:
  meta_name: str
  config_cls: Any
  stage: str  # the stage that writes it, named in the error when it is missing


_KINDS = {
  "encoder": _Kind(encoder_checkpoint.META_NAME, Dinov2Config, "convert"),
  "fae": _Kind(EXPORT_META, fae_model.FaeConfig, "fae"),
  "pixel": _Kind(EXPORT_META, pd.PixelDecoderConfig, "pixel"),
  "diffusion": _Kind(EXPORT_META, dit_model.DitConfig, "diffusion"),
  "flow": _Kind(EXPORT_META, tarflow_model.TarFlowConfig, "flow"),
}
EXPORT_KINDS = tuple(_KINDS)


def export_dir(workdir: epath.PathLike, stage: str, name: str = EXPORT) -> epath.Path:
  """`<workdir>/<stage>/<name>`: e.g. `fae/export`, `pixel/export_noisy`."""
  return epath.Path(workdir) / stage / name


def encoder_dir(root: epath.PathLike) -> epath.Path:
  """`<root>/encoder`; `root` is the run's workdir or its `config.upstream_workdir`."""
  return epath.Path(root) / ENCODER


def export_exists(directory: epath.PathLike, kind: str = "fae") -> bool:
  return params_store.exists(directory, _kind(kind).meta_name)


def _kind(kind: str) -> _Kind:
  if kind not in _KINDS:
    raise ValueError(f"Unknown export kind {kind!r}; choose from {EXPORT_KINDS}.")
  return _KINDS[kind]


def load_export(kind: str, directory: epath.PathLike) -> tuple[Any, Any, dict[str, Any]]:
  """`(params, model config, meta)` of an export; `kind` is one of `EXPORT_KINDS`.

  The model config is the kind's config class (`FaeConfig`, `PixelDecoderConfig`, `DitConfig`,
  `TarFlowConfig`, `Dinov2Config` for the encoder) read from the export's JSON.

  Raises:
    FileNotFoundError: nothing is saved there; names the stage that writes it.
  """
  k = _kind(kind)
  hint = f"Run the `{k.stage}` stage first (add '{k.stage}' to config.stages)."
  meta = params_store.load_meta(directory, k.meta_name, hint)
  return params_store.load_params(directory), k.config_cls.from_dict(meta["config"]), meta


def save_export(directory: epath.PathLike, params: Any, meta: dict[str, Any]) -> dict[str, Any]:
  """Writes an export once (params gathered to the host as float32, `model.json`)."""
  return params_store.save_params(directory, params, meta, EXPORT_META)


def replace_export(directory: epath.Path, params: Any, meta: dict[str, Any]) -> None:
  """Writes an export, replacing one of another `(phase, step)` (e.g. a phase trained longer).

  Collective. GCS-safe: no directory is renamed (on `gs://` a rename is a copy plus a delete).
  The old export is uncommitted first (its `model.json` deleted, then its files), then the new
  one is written and committed, so a reader (and a crash at any point) finds the old export, the
  new one, or none; never a mix. None only after a crash here: the stage did not finish, so the
  rerun restores the phase's last checkpoint and exports it again. Process 0 decides.
  """
  directory = epath.Path(directory)

  def current() -> str:
    if not params_store.exists(directory, EXPORT_META):
      return "absent"
    old = params_store.load_meta(directory, EXPORT_META, "")
    same = (old.get("phase"), old.get("step")) == (meta["phase"], meta["step"])
    return "same" if same else "other"

  state = multihost.decide_once(f"replace-export:{directory}", current)
  if state == "same":
    return
  if state == "other":
    if multihost.is_primary():
      multihost.remove_directory(directory, EXPORT_META)
    multihost.barrier(f"replace-export-removed:{directory}")
  save_export(directory, params, meta)


def encoder_spec(config: ml_collections.ConfigDict, backbone: Dinov2Config) -> EncoderSpec:
  """The frozen encoder's `EncoderSpec`: the backbone plus `config.encoder`'s input settings."""
  return EncoderSpec(
    backbone=backbone,
    image_size=int(config.encoder.image_size),
    features=config.encoder.features,
  )


def load_frozen_encoder(
  directory: str | os.PathLike, config: ml_collections.ConfigDict
) -> tuple[Any, EncoderSpec, dict[str, Any]]:
  """`(params, EncoderSpec, encoder.json)` of the converted encoder in `directory`.

  `config.encoder` supplies how images reach it (input size, feature kind).
  """
  params, backbone, meta = encoder_checkpoint.load_encoder(directory)
  return params, encoder_spec(config, backbone), meta


def load_encoder_spec(
  directory: str | os.PathLike, config: ml_collections.ConfigDict
) -> tuple[EncoderSpec, dict[str, Any]]:
  """`(EncoderSpec, encoder.json)` without reading the weights."""
  meta = encoder_checkpoint.load_metadata(directory)
  return encoder_spec(config, Dinov2Config.from_dict(meta["config"])), meta


def load_fae_for_encoder(
  directory: epath.PathLike, encoder_fingerprint: str
) -> tuple[Any, fae_model.FaeConfig, dict[str, Any]]:
  """The FAE export, checked to have been trained on features of this run's encoder."""
  params, cfg, meta = load_export("fae", directory)
  if meta.get("encoder_fingerprint") != encoder_fingerprint:
    raise ValueError(
      f"{directory} was trained on features of another encoder (fingerprint "
      f"{meta.get('encoder_fingerprint')}, this run's encoder {encoder_fingerprint}); "
      "rerun the `fae` stage in this workdir."
    )
  return params, cfg, meta
