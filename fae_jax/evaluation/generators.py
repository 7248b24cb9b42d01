"""The generators the `evaluate` stage samples from, built from their exports.

`GENERATORS` maps a generator's name (the stage that trains it: `diffusion`, the LightningDiT
with the flow-matching samplers of `fae_jax.flow_matching.dit_sampler`; `flow`, the TarFlow
with `fae_jax.tarflow.sampler`) to a function of the config and that stage's export directory
returning its evaluation runs (the trained model at each guidance setting and a freshly
initialised reference), its latent statistics and the sampler settings the report records.
Samplers are built lazily, when their run starts, on this process's devices (`sampling_mesh`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from fae_jax import artifacts, sharding
from fae_jax.flow_matching import dit_sampler
from fae_jax.models import dit as dit_model
from fae_jax.models import tarflow
from fae_jax.tarflow import sampler as tarflow_sampler

# A generator for evaluation: `(rng, labels [B]) -> normalised latents [B, h, w, c]` given its
# guidance setting (the latent statistics undo the normalisation).
SampleFn = dit_sampler.SampleFn


def sampler_settings(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  ev = config.evaluate
  out = {}
  for name in ("unguided", "guided"):
    s = ev[name]
    out[name] = {
      "method": s.method,
      "num_steps": int(s.num_steps),
      "bands": tuple(tuple(float(v) for v in band) for band in s.bands),
      "diffusion_coeff": float(s.get("diffusion_coeff", 1.0)),
    }
  return out


def diffusion_generators(
  config: ml_collections.ConfigDict, export_dir: epath.Path
) -> dict[str, tuple[dit_model.Dit, Any, dict[str, np.ndarray], dict[str, Any]]]:
  """`{"trained": (model, params, stats, meta), "untrained": (...)}` for the DiT exported in
  `export_dir`; `meta` is the export's `model.json` (both entries share it), `stats` its
  per-channel latent statistics."""
  params, mcfg, meta = artifacts.load_export("diffusion", export_dir)
  model = dit_model.Dit(mcfg, dtype=jnp.dtype(config.diffusion.dtype))
  stats = {k: np.asarray(v, np.float32) for k, v in meta["latent_stats"].items()}
  x0 = jnp.zeros((1, mcfg.input_size, mcfg.input_size, mcfg.in_channels))
  fresh = jax.jit(
    lambda k: model.init(k, x0, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False)
  )(jax.random.key(config.seed + 1))["params"]
  return {"trained": (model, params, stats, meta), "untrained": (model, fresh, stats, meta)}


# One evaluation run: `(which, setting, () -> SampleFn)`; which is 'trained' or 'untrained' (the
# freshly initialised reference, unguided only); the sampler is built when the run starts.
Run = tuple[str, str, Callable[[], SampleFn]]


def diffusion_runs(
  config: ml_collections.ConfigDict, export_dir: epath.Path
) -> tuple[list[Run], dict[str, np.ndarray], dict[str, Any]]:
  """The DiT's runs (trained x each setting, untrained unguided), its latent statistics and the
  sampler settings for the report."""
  settings = sampler_settings(config)
  gens = diffusion_generators(config, export_dir)
  shift = float(gens["trained"][3]["time_shift"])

  def build(which: str, name: str) -> Callable[[], SampleFn]:
    model, params, _, _ = gens[which]
    return lambda: dit_sampler.make_sample_fn(
      model, params, shift=shift, setting=settings[name], mesh=sampling_mesh()
    )

  pairs = [("trained", name) for name in settings] + [("untrained", "unguided")]
  runs = [(which, name, build(which, name)) for which, name in pairs]
  samplers = {k: {**v, "bands": [list(b) for b in v["bands"]]} for k, v in settings.items()}
  return runs, gens["trained"][2], samplers


def flow_settings(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
  """`unguided` (guidance scale 1) and `guided` (`config.flow.sample.guidance_scale`)."""
  s = config.flow.sample
  common = {
    "temperature": float(s.temperature),
    "denoise": bool(s.denoise),
    "cache": bool(s.get("cache", True)),
  }
  return {
    "unguided": {**common, "guidance_scale": 1.0},
    "guided": {**common, "guidance_scale": float(s.guidance_scale)},
  }


def make_flow_sampler(
  model: tarflow.TarFlow, params: Any, *, setting: dict[str, Any], mesh
) -> SampleFn:
  """Jitted, batch-sharded sampling of normalised latents with the flow (replicated params)."""
  scale = setting["guidance_scale"]
  jitted = tarflow_sampler.make_sample_fn(
    model,
    mesh=mesh,
    temperature=setting["temperature"],
    guidance=None if scale == 1.0 else scale,
    cache=setting["cache"],
    denoise_step=setting["denoise"],
  )
  params = jax.device_put(params, sharding.replicated(mesh))
  return lambda rng, labels: jitted(params, rng, labels)


def flow_runs(
  config: ml_collections.ConfigDict, export_dir: epath.Path
) -> tuple[list[Run], dict[str, np.ndarray], dict[str, Any]]:
  """The flow's runs (trained x each setting, untrained unguided: a fresh flow is the identity,
  so that reference decodes Gaussian noise), its latent statistics and sampler settings."""
  params, mcfg, meta = artifacts.load_export("flow", export_dir)
  model = tarflow.TarFlow(mcfg)
  stats = {k: np.asarray(v, np.float32) for k, v in meta["latent_stats"].items()}
  settings = flow_settings(config)
  x0 = jnp.zeros((1, mcfg.input_size, mcfg.input_size, mcfg.in_channels))

  def fresh() -> Any:
    init = jax.jit(lambda k: model.init(k, x0, jnp.zeros((1,), jnp.int32))["params"])
    return init(jax.random.key(config.seed + 1))

  def build(which: str, name: str) -> Callable[[], SampleFn]:
    def make() -> SampleFn:
      p = params if which == "trained" else fresh()
      return make_flow_sampler(model, p, setting=settings[name], mesh=sampling_mesh())

    return make

  pairs = [("trained", name) for name in settings] + [("untrained", "unguided")]
  return [(which, name, build(which, name)) for which, name in pairs], stats, settings


# The generators `config.evaluate.generators` may name (the stage that trains each): name ->
# `(config, the stage's export directory) -> (runs, latent stats, sampler settings for the report)`.
GENERATORS: dict[
  str,
  Callable[[ml_collections.ConfigDict, epath.Path], tuple[list[Run], dict[str, np.ndarray], Any]],
] = {
  "diffusion": diffusion_runs,
  "flow": flow_runs,
}


def sampling_mesh() -> Mesh:
  """This process's devices: each process samples its own shards at its own pace, without
  collectives, so one slow or restarted host does not hold the others."""
  return sharding.make_mesh(data=-1, fsdp=1, devices=jax.local_devices())
