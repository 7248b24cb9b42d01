"""Config validation before any work: every value that is wrong on its face, caught up front.

`main.run_stages` calls `check_config` before it creates the workdir, so a bad value costs
nothing: no convert, no encode, no file written. Each problem names the key, the reason and the
fix, and every problem is listed at once (one rerun fixes them all):

  * unknown stage names in `config.stages`;
  * the mesh: `mesh.data`/`mesh.fsdp` not -1 or >= 1, or a product that is not the device count
    (`sharding.make_mesh`'s own check);
  * steps and batch sizes of every stage that runs: `<stage>.train.num_steps` (>= 1; >= 0 for a
    pixel phase, 0 disabling it), `<stage>.train.batch_size`, the eval batch sizes,
    `encode.batch_size`, `encode.examples_per_shard`, `evaluate.batch_size`/`num_samples`;
  * a global batch not divisible by the mesh's batch shards (`sharding.check_batch_divisible`,
    the check each training stage repeats when it starts), by the devices for `encode`/`latents`,
    by this process's devices for `evaluate`'s sampling mesh;
  * `fae.model.latent_dim` < 1;
  * the optimizer of each training stage (`optim.make_optimizer`'s checks: the schedule kind, a
    cosine schedule no longer than its warmup);
  * a stage module's own `check_config(config)` when it defines one (e.g. `pixel`'s input and
    loss kinds), so those checks live next to the code they protect and still run up front.

The stage registry comes in as an argument: nothing below `fae_jax.stages` imports it.
Sweep names are checked where they are read (`configs/common.py`'s `sweep`, `launch/sweep.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from fae_jax import sharding
from fae_jax.evaluation.generators import sampling_mesh
from fae_jax.train import optim


class ConfigError(ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


# Stage -> (dotted key of a train config, minimum num_steps). Pixel phases may be 0 (disabled).
TRAIN_CONFIGS = {
  "fae": (("fae.train", 1),),
  "pixel": (("pixel.noisy.train", 0), ("pixel.finetune.train", 0)),
  "diffusion": (("diffusion.train", 1),),
  "flow": (("flow.train", 1),),
}
# Stage -> dotted keys that must be integers >= 1.
POSITIVE = {
  "encode": ("encode.batch_size", "encode.examples_per_shard"),
  "latents": ("encode.batch_size", "encode.examples_per_shard"),
  "fae": ("fae.eval.batch_size", "fae.model.latent_dim"),
  "pixel": ("pixel.eval.batch_size",),
  "evaluate": ("evaluate.batch_size", "evaluate.num_samples", "evaluate.samples_per_shard"),
}


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """`config` at dotted `key`."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _at_least(config, key: str, minimum: int, problems: list[str]) -> bool:
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    problems.append(
      f"config.{key}={value!r}: must be {what}; set --config.{key}=N with N >= {minimum}."
    )
    return False
  return True


def _divisible(batch: int, mesh: Mesh, key: str, problems: list[str]) -> None:
  try:
    sharding.check_batch_divisible(batch, mesh, f"config.{key}")
  except ValueError as e:
    problems.append(str(e))


def check_stage_names(stages, known: Mapping[str, Any]) -> list[str]:
  unknown = [s for s in stages if s not in known]
  if not unknown:
    return []
  return [
    f"config.stages names unknown stage(s) {unknown}: not a stage of the pipeline; use names "
    f"from {list(known)} (e.g. --config.stages=\"('fae',)\")."
  ]


def _mesh(config, problems: list[str]) -> Mesh | None:
  ok = True
  for axis in ("data", "fsdp"):
    value = config.mesh[axis]
    if not isinstance(value, int) or (value != -1 and value < 1):
      problems.append(
        f"config.mesh.{axis}={value!r}: a mesh axis is -1 (the remaining devices) or >= 1; set "
        f"--config.mesh.{axis}=-1 or a divisor of the {jax.device_count()} devices."
      )
      ok = False
  if not ok:
    return None
  try:
    return sharding.mesh_from_config(config.mesh)
  except ValueError as e:
    problems.append(f"config.mesh: {e}")
    return None


def check_config(config: ml_collections.ConfigDict, stages: Mapping[str, Any]) -> Mesh:
  """Validates `config` for the stages it runs; returns the mesh. Raises `ConfigError`.

  Args:
    config: the run's config.
    stages: the stage registry (`fae_jax.stages.STAGES`): name -> module; a module's optional
      `check_config(config)` runs for the stages in `config.stages`.
  """
  problems = check_stage_names(config.stages, stages)
  run = [s for s in config.stages if s in stages]
  mesh = _mesh(config, problems)
  for stage in run:
    for key in POSITIVE.get(stage, ()):
      _at_least(config, key, 1, problems)
    for key, min_steps in TRAIN_CONFIGS.get(stage, ()):
      steps_ok = _at_least(config, f"{key}.num_steps", min_steps, problems)
      if not steps_ok or int(get(config, f"{key}.num_steps")) == 0:
        continue  # a disabled pixel phase trains nothing: its batch is never used
      if _at_least(config, f"{key}.batch_size", 1, problems) and mesh is not None:
        _divisible(int(get(config, f"{key}.batch_size")), mesh, f"{key}.batch_size", problems)
      try:  # the optimizer's own checks (schedule kind, warmup shorter than the run)
        optim.make_optimizer(get(config, key))
      except ValueError as e:
        problems.append(f"config.{key}: {e}")
  if {"encode", "latents"} & set(run):
    key = "encode.batch_size"
    if _at_least(config, key, 1, []) and mesh is not None:
      # Each process encodes batch / process_count examples over its own devices.
      all_devices = sharding.make_mesh(data=-1, fsdp=1)
      _divisible(int(config.encode.batch_size), all_devices, key, problems)
  if "evaluate" in run and _at_least(config, "evaluate.batch_size", 1, []):
    _divisible(int(config.evaluate.batch_size), sampling_mesh(), "evaluate.batch_size", problems)
  for stage in run:
    check = getattr(stages[stage], "check_config", None)
    if check is not None:
      try:
        check(config)
      except ValueError as e:
        problems.append(str(e))
  if problems:
    raise ConfigError(
      f"The config has {len(problems)} problem(s); nothing was run or written:\n"
      + "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
    )
  return mesh
