"""Stage `evaluate`: class-conditional samples from the trained generators, decoded and scored.

For each generator in `config.evaluate.generators` and each guidance setting, it draws
`num_samples` latents with balanced labels. `diffusion` (the DiT): `unguided` is the sampler of
`config.evaluate.unguided`, no guidance; `guided` the sampler and bands of
`config.evaluate.guided`. `flow` (the TarFlow): `unguided` inverts at guidance scale 1, `guided`
at `config.flow.sample.guidance_scale`, both with `config.flow.sample.temperature` and the
optional denoising step. Both then share one path: it un-normalises the latents, decodes them
to images (FAE feature decoder -> pixel decoder, `fae_jax.autoencoder`), writes a PNG grid (one
row per class) and computes:

  * FD-DINOv2: the Frechet distance between the frozen encoder's mean-pooled patch features of
    the generated images and of the held-out real split (`fae_jax.evaluation.frechet`; square
    roots by symmetric eigendecomposition in float64). The real-vs-real floor compares the
    train split with the held-out split at the same sample count; a freshly initialised
    generator gives the untrained reference.
  * Class consistency: a linear probe trained on real train-split features classifies the
    generated images; its accuracy against the conditioning labels (chance = 1 / classes).

Real features come from the `encode` stage's caches when present (bfloat16), otherwise the
frozen encoder runs on the images. Results go to `eval/metrics.json`, the grids to
`eval/<generator>_<setting>.png` (and TensorBoard), and report.json gets `real.*` and
`<generator>.*` keys. Complete when `eval/metrics.json` exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from fae_jax import artifacts, encoder_checkpoint, multihost, sharding
from fae_jax import report as report_lib
from fae_jax.autoencoder import Autoencoder
from fae_jax.data import feature_cache, pipeline, sources
from fae_jax.evaluation import frechet, grids, linear_probe
from fae_jax.fileio import write_json_atomic
from fae_jax.flow_matching import dit_sampler
from fae_jax.models import dit as dit_model
from fae_jax.models import tarflow
from fae_jax.stages.context import StageContext
from fae_jax.tarflow import sampler as tarflow_sampler

NAME = "evaluate"
OUTPUT = "eval"
METRICS = "metrics.json"

# A generator for evaluation: `(rng, labels [B]) -> normalised latents [B, h, w, c]` given its
# guidance setting (the latent statistics undo the normalisation).
SampleFn = dit_sampler.SampleFn


def is_complete(ctx: StageContext) -> bool:
  return (ctx.workdir / OUTPUT / METRICS).exists()


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """`num_samples` labels, each class equally often (class-major order, for row-per-class grids)."""
  if num_samples % num_classes:
    raise ValueError(
      f"config.evaluate.num_samples={num_samples} is not a multiple of the {num_classes} classes."
    )
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_samples // num_classes)


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


def generate_images(
  sample_fn: SampleFn,
  ae: Autoencoder,
  stats: dict[str, np.ndarray],
  labels: np.ndarray,
  rng: jax.Array,
  batch_size: int,
) -> np.ndarray:
  """Samples, un-normalises and decodes; uint8 `[N, H, W, 3]` in the order of `labels`."""
  out = []
  for i in range(0, len(labels), batch_size):
    y = labels[i : i + batch_size]
    n = len(y)
    if n < batch_size:  # one compiled shape
      y = np.concatenate([y, np.zeros(batch_size - n, np.int32)])
    z = sample_fn(jax.random.fold_in(rng, i), jnp.asarray(y))
    z = multihost.gather(z) * stats["std"] + stats["mean"]  # sharded over every host's devices
    out.append(np.asarray(ae.decode(z))[:n])
  return np.concatenate(out)


def pooled_features(ae: Autoencoder, images: np.ndarray, batch_size: int) -> np.ndarray:
  feats = []
  for i in range(0, len(images), batch_size):
    x = images[i : i + batch_size]
    n = len(x)
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
    feats.append(np.asarray(linear_probe.pool_tokens(ae.features(x)))[:n])
  return np.concatenate(feats)


def real_pooled_features(
  ctx: StageContext, ae: Autoencoder, split_key: str, max_examples: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """Pooled features and labels of real images (the feature cache when it is there)."""
  xs, ys = [], []
  cache = feature_cache.cache_dir(ctx.upstream, split_key)
  use_cache = ctx.config.fae.input == "cache" and multihost.decide_once(
    f"evaluate:cache:{split_key}", lambda: (cache / "manifest.json").exists()
  )
  if use_cache:
    encoder = (None, ae.spec, encoder_checkpoint.load_metadata(ctx.encoder_dir))
    for x, y in feature_cache.feature_batches(
      ctx.upstream,
      ctx.config,
      split_key,
      max_examples=max_examples,
      batch_size=batch_size,
      encoder=encoder,
      from_cache=True,
    ):
      xs.append(np.asarray(linear_probe.pool_tokens(x)))
      ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)
  split = feature_cache.split_name(ctx.config, split_key)
  source = sources.make_source(ctx.config.data, split)
  n = min(len(source), max_examples)
  ds = pipeline.make_ordered_dataset(
    ctx.config.data,
    split,
    batch_size=batch_size,
    end_index=n,
    process_index=0,
    process_count=1,
    source=source,
  )
  for batch in ds:
    keep = batch["valid"].astype(bool)
    xs.append(pooled_features(ae, batch["image"][keep], batch_size))
    ys.append(batch["label"][keep])
  return np.concatenate(xs), np.concatenate(ys)


def fd(a: np.ndarray, b: np.ndarray) -> float:
  return float(
    frechet.frechet_distance(
      frechet.FeatureStats.from_features(a), frechet.FeatureStats.from_features(b)
    )
  )


def diffusion_generators(
  ctx: StageContext,
) -> dict[str, tuple[dit_model.Dit, Any, dict[str, np.ndarray], dict[str, Any]]]:
  """`{"trained": (model, params, stats, meta), "untrained": (...)}` for the DiT; `meta` is the
  export's `model.json` (both entries share it), `stats` its per-channel latent statistics."""
  params, mcfg, meta = artifacts.load_export(
    "diffusion", artifacts.export_dir(ctx.input_root("diffusion"), "diffusion")
  )
  model = dit_model.Dit(mcfg, dtype=jnp.dtype(ctx.config.diffusion.dtype))
  stats = {k: np.asarray(v, np.float32) for k, v in meta["latent_stats"].items()}
  x0 = jnp.zeros((1, mcfg.input_size, mcfg.input_size, mcfg.in_channels))
  fresh = jax.jit(
    lambda k: model.init(k, x0, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False)
  )(jax.random.key(ctx.config.seed + 1))["params"]
  return {"trained": (model, params, stats, meta), "untrained": (model, fresh, stats, meta)}


# One evaluation run: `(which, setting, () -> SampleFn)`; which is 'trained' or 'untrained' (the
# freshly initialised reference, unguided only); the sampler is built when the run starts.
Run = tuple[str, str, Callable[[], SampleFn]]


def diffusion_runs(ctx: StageContext) -> tuple[list[Run], dict[str, np.ndarray], dict[str, Any]]:
  """The DiT's runs (trained x each setting, untrained unguided), its latent statistics and the
  sampler settings for the report."""
  settings = sampler_settings(ctx.config)
  gens = diffusion_generators(ctx)
  shift = float(gens["trained"][3]["time_shift"])

  def build(which: str, name: str) -> Callable[[], SampleFn]:
    model, params, _, _ = gens[which]
    return lambda: dit_sampler.make_sample_fn(
      model, params, shift=shift, setting=settings[name], mesh=ctx.mesh
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


def flow_runs(ctx: StageContext) -> tuple[list[Run], dict[str, np.ndarray], dict[str, Any]]:
  """The flow's runs (trained x each setting, untrained unguided: a fresh flow is the identity,
  so that reference decodes Gaussian noise), its latent statistics and sampler settings."""
  params, mcfg, meta = artifacts.load_export(
    "flow", artifacts.export_dir(ctx.input_root("flow"), "flow")
  )
  model = tarflow.TarFlow(mcfg)
  stats = {k: np.asarray(v, np.float32) for k, v in meta["latent_stats"].items()}
  settings = flow_settings(ctx.config)
  x0 = jnp.zeros((1, mcfg.input_size, mcfg.input_size, mcfg.in_channels))

  def fresh() -> Any:
    init = jax.jit(lambda k: model.init(k, x0, jnp.zeros((1,), jnp.int32))["params"])
    return init(jax.random.key(ctx.config.seed + 1))

  def build(which: str, name: str) -> Callable[[], SampleFn]:
    def make() -> SampleFn:
      p = params if which == "trained" else fresh()
      return make_flow_sampler(model, p, setting=settings[name], mesh=ctx.mesh)

    return make

  pairs = [("trained", name) for name in settings] + [("untrained", "unguided")]
  return [(which, name, build(which, name)) for which, name in pairs], stats, settings


# The generators `config.evaluate.generators` may name (the stage that trains each):
# name -> `(ctx) -> (runs, latent stats, sampler settings for the report)`.
GENERATORS: dict[str, Callable[[StageContext], tuple[list[Run], dict[str, np.ndarray], Any]]] = {
  "diffusion": diffusion_runs,
  "flow": flow_runs,
}


def run(ctx: StageContext) -> dict:
  config = ctx.config
  ev = config.evaluate
  out_dir = ctx.workdir / OUTPUT
  out_dir.mkdir(parents=True, exist_ok=True)
  ae = Autoencoder.load(
    ctx.workdir,
    encoder_dir=ctx.encoder_dir,
    fae_dir=artifacts.export_dir(ctx.input_root("fae"), "fae"),
    pixel_dir=artifacts.export_dir(ctx.input_root("pixel"), "pixel"),
  )
  num_classes = sources.num_classes(config.data)
  n = int(ev.num_samples)
  bs = int(ev.batch_size)
  sharding.check_batch_divisible(bs, ctx.mesh, "config.evaluate.batch_size")

  logging.info("evaluate: real features (held-out split and the train-split floor)")
  real_eval, _ = real_pooled_features(ctx, ae, "eval", n, bs)
  real_train, real_train_y = real_pooled_features(
    ctx, ae, "train", max(n, int(ev.probe_train_examples)), bs
  )
  floor = fd(real_train[:n], real_eval[:n])
  probe = linear_probe.train_linear_probe(
    real_train, real_train_y, num_classes, steps=int(ev.probe_steps), seed=config.seed
  )
  metrics: dict[str, Any] = {
    "real": {
      "fd_dinov2_floor": floor,
      "num_samples": int(min(n, len(real_eval))),
      "probe_train_examples": int(len(real_train_y)),
    }
  }
  writer = metric_writers.create_default_writer(str(out_dir), just_logging=jax.process_index() > 0)
  labels = balanced_labels(n, num_classes)
  rng = jax.random.key(config.seed)
  unknown = [g for g in ev.generators if g not in GENERATORS]
  if unknown:
    raise ValueError(
      f"config.evaluate.generators: unknown generator(s) {unknown}; choose from "
      f"{tuple(GENERATORS)}."
    )
  for generator in ev.generators:
    runs, stats, samplers = GENERATORS[generator](ctx)
    res: dict[str, Any] = {}
    for which, name, make_sample_fn in runs:
      sample_fn = make_sample_fn()
      logging.info("evaluate: %s %s %s samples (%s)", n, generator, which, name)
      images = generate_images(sample_fn, ae, stats, labels, jax.random.fold_in(rng, 7), bs)
      feats = pooled_features(ae, images, bs)
      if not np.isfinite(feats).all():
        raise FloatingPointError(f"{generator} {which} {name}: non-finite generated features.")
      fd_value = fd(feats, real_eval[:n])
      if which == "untrained":
        res["fd_dinov2_untrained"] = fd_value
        continue
      acc = linear_probe.probe_accuracy(probe, feats, labels)
      res[f"fd_dinov2_{name}"] = fd_value
      res[f"class_consistency_{name}"] = float(acc)
      per_class = int(ev.grid_per_class)
      pick = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(num_classes)])
      grid = grids.make_grid(
        grids.upscale_nearest(images[pick], int(ev.grid_upscale)), cols=per_class
      )
      path = out_dir / f"{generator}_{name}.png"
      if multihost.is_primary():  # one writer per file
        grids.save_png(path, grid)
      grids.write_grid_to_tensorboard(writer, 0, f"{generator}/{name}", grid)
      res[f"grid_png_{name}"] = str(path)
    res["grid_png"] = res.get("grid_png_guided", res.get("grid_png_unguided"))
    res["chance_accuracy"] = 1.0 / num_classes
    res["samplers"] = samplers
    metrics[generator] = res
  writer.close()
  if multihost.is_primary():
    write_json_atomic(out_dir / METRICS, metrics)
    for section, values in metrics.items():
      report_lib.update_report(ctx.workdir, section, values)
  logging.info("evaluate: %s", json.dumps(metrics, indent=2, default=str))
  summary = {"metrics": str(out_dir / METRICS)}
  for generator in ev.generators:
    for key in ("fd_dinov2_guided", "class_consistency_guided"):
      summary[f"{generator}.{key}"] = metrics[generator].get(key)
  return summary
