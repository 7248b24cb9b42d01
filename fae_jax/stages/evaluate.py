"""Stage `evaluate`: where quality is lost, from real images to generated samples.

One held-out set (the first `num_samples` images of the eval split) is the reference of every
number, so the rows of the summary table compare (`real`, `recon`, then each generator):

  * `real`: the floor, FD-DINOv2 of the train split vs the held-out set at the same count, and
    the class-consistency probe's accuracy on the held-out images (`probe_top1_eval`, the
    ceiling of every class consistency below).
  * `recon`: the held-out images reconstructed through the full path image -> encoder -> FAE
    (posterior mean) -> feature decoder -> pixel decoder (`fd_dinov2`, `class_consistency`,
    `precision_dinov2`, `recall_dinov2`) and through the noisy-feature path, the phase-`noisy`
    pixel decoder on the clean encoder features as the `pixel` stage evaluates it (the same
    keys with `_noisy`).
  * `<generator>`: for each of `config.evaluate.generators` and each guidance setting,
    `num_samples` class-conditional samples with balanced labels, decoded (FAE feature decoder
    -> pixel decoder, `fae_jax.autoencoder`): `fd_dinov2_<setting>`, `class_consistency_<...>`,
    `precision_dinov2_<...>`, `recall_dinov2_<...>`, and with `config.evaluate.inception_dir`
    the ADM evaluator's table against `config.evaluate.reference_npz`: `fid_<...>`,
    `sfid_<...>`, `inception_score_<...>`, `precision_<...>`, `recall_<...>` (Inception pool3).
    A freshly initialised generator gives `fd_dinov2_untrained`.

Settings. `diffusion` (the DiT): `unguided` is the sampler of `config.evaluate.unguided`, no
guidance; `guided` the sampler and bands of `config.evaluate.guided`. `flow` (the TarFlow):
`unguided` inverts at guidance scale 1, `guided` at `config.flow.sample.guidance_scale`, both
with `config.flow.sample.temperature` and the optional denoising step.

Metrics: FD-DINOv2 is the Frechet distance between the frozen encoder's mean-pooled patch
features (`fae_jax.evaluation.frechet`, float64); class consistency the accuracy of a linear
probe trained on real train-split features against the conditioning (or true) labels (chance
= 1 / classes); improved precision/recall (k = 3, `fae_jax.evaluation.generative`) in the same
DINOv2 space, so fidelity and coverage show separately.

Sharding and preemption (`fae_jax.evaluation.sample_shards`). Every pass (the held-out images,
each generator x setting) is cut into shards of `config.evaluate.samples_per_shard`; shard `j`
is made by process `j % process_count` on its own devices (`sampling_mesh`), with the random key
`fold_in(key, j)`, and written atomically with its images, labels and features. A restarted
stage makes only the missing shards: no sample is duplicated or lost. After a barrier every
process reads all shards' features (metrics are computed identically everywhere; precision and
recall split their distance blocks over processes), and process 0 gathers the images into one
ADM sample batch `eval/<generator>_<setting>.npz` (`arr_0` uint8, `arr_1` labels; feed it to
`python -m fae_jax.fid` or the ADM evaluator) and writes the PNG grid (one row per class).

Outputs: `eval/held_out/`, `eval/<generator>_<setting>/samples-*.npz` (shards + `plan.json`),
`eval/<generator>_<setting>.npz`, `eval/<generator>_<setting>.png` (and TensorBoard),
`eval/metrics.json`; report.json gets the `real`, `recon` and `<generator>` sections. Complete
when `eval/metrics.json` exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from fae_jax import artifacts, encoder_checkpoint, multihost, sharding
from fae_jax import report as report_lib
from fae_jax.autoencoder import Autoencoder
from fae_jax.convert.inception import load_inception
from fae_jax.data import feature_cache, pipeline, sources
from fae_jax.evaluation import (
  adm_npz,
  frechet,
  generative,
  generators,
  grids,
  inception_features,
  linear_probe,
  sample_shards,
)
from fae_jax.fileio import write_json_atomic
from fae_jax.stages.context import StageContext

NAME = "evaluate"
OUTPUT = "eval"
METRICS = "metrics.json"
HELD_OUT = "held_out"
INCEPTION_KEYS = inception_features.OUTPUTS
GENERATORS = generators.GENERATORS
SampleFn = generators.SampleFn
sampling_mesh = generators.sampling_mesh


def is_complete(ctx: StageContext) -> bool:
  return (ctx.workdir / OUTPUT / METRICS).exists()


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """`num_samples` labels, each class equally often (class-major order, for row-per-class grids)."""
  if num_samples % num_classes:
    raise ValueError(
      f"config.evaluate.num_samples={num_samples} is not a multiple of the {num_classes} classes."
    )
  return np.repeat(np.arange(num_classes, dtype=np.int32), num_samples // num_classes)


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


def _padded_batches(x: np.ndarray, batch_size: int):
  """Yields `(batch [batch_size, ...] zero-padded, valid rows)`: one compiled shape."""
  for i in range(0, len(x), batch_size):
    b = x[i : i + batch_size]
    n = len(b)
    if n < batch_size:
      b = np.concatenate([b, np.zeros((batch_size - n, *b.shape[1:]), b.dtype)])
    yield b, n


def sample_shard_fn(
  sample_fn: Callable[[], SampleFn],
  ae: Any,
  stats: dict[str, np.ndarray],
  labels: np.ndarray,
  rng: jax.Array,
  batch_size: int,
  inception: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
) -> Callable[[int, int, int], dict[str, np.ndarray]]:
  """`make_shard` for `sample_shards.fill_shards`: samples `labels[start:stop]`.

  The shard's random key is `fold_in(rng, j)`, so a shard made again after a restart is the
  same. It holds `arr_0` (uint8 images), `arr_1` (labels), `index`, `dinov2` (the frozen
  encoder's pooled features `[n, D]`) and, with `inception`, the FID Inception's `pool3`,
  `spatial` and `logits_unbiased`.

  Args:
    sample_fn: builds the sampler (called once, on the first shard this process makes).
    ae: decodes latents (`ae.decode`) and gives features (`ae.features`).
  """
  built: list[SampleFn] = []

  def make(j: int, start: int, stop: int) -> dict[str, np.ndarray]:
    if not built:
      built.append(sample_fn())
    y = labels[start:stop]
    images = generate_images(built[0], ae, stats, y, jax.random.fold_in(rng, j), batch_size)
    feats = pooled_features(ae, images, batch_size)
    if not np.isfinite(feats).all():
      raise FloatingPointError(f"Shard {j}: non-finite features of the generated images.")
    out = {
      sample_shards.INDEX_KEY: np.arange(start, stop, dtype=np.int64),
      adm_npz.IMAGES_KEY: images,
      adm_npz.LABELS_KEY: y,
      "dinov2": feats,
    }
    if inception is not None:
      parts = [inception(b[:k]) for b, k in _padded_batches(images, batch_size)]
      out.update({k: np.concatenate([p[k] for p in parts]) for k in INCEPTION_KEYS})
    return out

  return make


def add_inception(
  directory: epath.Path,
  n: int,
  shard_size: int,
  inception: Callable[[np.ndarray], dict[str, np.ndarray]],
  batch_size: int,
) -> None:
  """Adds the Inception activations to this process's shards that lack them (samples made
  before `config.evaluate.inception_dir` was set are scored without being drawn again)."""
  for j in sample_shards.process_shards(n, shard_size, jax.process_index(), jax.process_count()):
    path = sample_shards.shard_path(directory, j)
    data = sample_shards.read_shard(path)
    if all(k in data for k in INCEPTION_KEYS):
      continue
    images = data[adm_npz.IMAGES_KEY]
    parts = [inception(b[:k]) for b, k in _padded_batches(images, batch_size)]
    data.update({k: np.concatenate([p[k] for p in parts]) for k in INCEPTION_KEYS})
    sample_shards.write_shard(path, data)


def noisy_decoder_params(ctx: StageContext, ae: Autoencoder) -> Any | None:
  """The phase-`noisy` pixel decoder (this run's, else the upstream run's), or None."""
  for root in (ctx.workdir, ctx.upstream):
    directory = artifacts.export_dir(root, "pixel", artifacts.PIXEL_EXPORT_NOISY)
    if artifacts.export_exists(directory, "pixel"):
      params, cfg, _ = artifacts.load_export("pixel", directory)
      if cfg != ae.decoder_config:
        raise ValueError(
          f"{directory} ({cfg}) and the final pixel decoder ({ae.decoder_config}) differ in "
          "architecture; they must come from one `pixel` stage run."
        )
      return params
  return None


def held_out_shard_fn(
  ctx: StageContext, ae: Autoencoder, noisy: Any | None, source: Any, batch_size: int
) -> Callable[[int, int, int], dict[str, np.ndarray]]:
  """`make_shard` of the held-out pass: per image, pooled frozen-encoder features of
  `real` (the image), `recon` (image -> encoder -> FAE -> pixel decoder) and `recon_noisy` (the
  phase-`noisy` decoder on the clean encoder features, as the `pixel` stage evaluates it)."""
  split = feature_cache.split_name(ctx.config, "eval")

  def pooled(images):
    return np.asarray(linear_probe.pool_tokens(ae.features(images)))

  def make(j: int, start: int, stop: int) -> dict[str, np.ndarray]:
    ds = pipeline.make_ordered_dataset(
      ctx.config.data,
      split,
      batch_size=batch_size,
      start_index=start,
      end_index=stop,
      process_index=0,
      process_count=1,
      source=source,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for batch in ds:
      keep = batch["valid"].astype(bool)
      x, n = next(_padded_batches(batch["image"][keep], batch_size))
      feats = ae.features(x)
      rows = {
        sample_shards.INDEX_KEY: batch["id"][keep].astype(np.int64),
        "label": batch["label"][keep].astype(np.int32),
        "real": np.asarray(linear_probe.pool_tokens(feats))[:n],
        "recon": pooled(ae.decode(ae.encode_features(feats)))[:n],
      }
      if noisy is not None:
        rows["recon_noisy"] = pooled(ae.decode_features(feats, noisy))[:n]
      for k, v in rows.items():
        parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}

  return make


def held_out(
  ctx: StageContext, ae: Autoencoder, n: int, batch_size: int, shard_size: int
) -> dict[str, np.ndarray]:
  """The first `n` held-out images' features (`held_out_shard_fn`), made in resumable shards
  over all processes (`eval/held_out/`); every process returns all of them.

  Returns `{index [m], label [m], real [m, D], recon [m, D], recon_noisy [m, D] (when the
  phase-`noisy` decoder exists)}`: the floor, the reconstructions and every generator are
  measured against this one `real` array.
  """
  config = ctx.config
  split = feature_cache.split_name(config, "eval")
  source = sources.make_source(config.data, split)
  limit = feature_cache.split_limit(config, "eval")
  m = min(n, len(source), *([int(limit)] if limit is not None else []))
  noisy = noisy_decoder_params(ctx, ae)
  directory = ctx.workdir / OUTPUT / HELD_OUT
  sample_shards.check_plan(
    directory,
    {"split": split, "num_images": m, "shard_size": shard_size, "noisy": noisy is not None},
  )
  make = held_out_shard_fn(ctx, ae, noisy, source, batch_size)
  sample_shards.fill_shards(directory, m, shard_size, make, name="evaluate held-out")
  multihost.barrier("evaluate-held-out")
  keys = ["label", "real", "recon"] + (["recon_noisy"] if noisy is not None else [])
  return sample_shards.read_shards(directory, m, shard_size, keys)


def dinov2_metrics(
  probe: Any, real: np.ndarray, feats: np.ndarray, labels: np.ndarray, suffix: str = ""
) -> dict[str, float]:
  """FD-DINOv2, class consistency and improved precision/recall of `feats` vs `real`."""
  precision, recall = generative.precision_recall(real, feats)
  return {
    f"fd_dinov2{suffix}": fd(feats, real),
    f"class_consistency{suffix}": float(linear_probe.probe_accuracy(probe, feats, labels)),
    f"precision_dinov2{suffix}": precision,
    f"recall_dinov2{suffix}": recall,
  }


def export_step(ctx: StageContext, generator: str) -> int | None:
  """The training step of a generator's export (recorded in its shards' plan)."""
  path = artifacts.export_dir(ctx.input_root(generator), generator) / artifacts.EXPORT_META
  return json.loads(path.read_text()).get("step") if path.exists() else None


def write_samples_npz(
  directory: epath.Path, n: int, shard_size: int, path: epath.Path, labels: np.ndarray
) -> None:
  """Gathers a setting's shards into one ADM sample batch (`arr_0` uint8, `arr_1` labels),
  streamed shard by shard. Process 0 only, after every process's shards are written."""
  first = sample_shards.read_shard(sample_shards.shard_path(directory, 0), [adm_npz.IMAGES_KEY])
  shape = first[adm_npz.IMAGES_KEY].shape[1:]
  batches = (
    s[adm_npz.IMAGES_KEY]
    for s in sample_shards.iter_shards(directory, n, shard_size, [adm_npz.IMAGES_KEY])
  )
  adm_npz.write_samples_streamed(path, batches, shape, labels)


def shard_rows(directory: epath.Path, shard_size: int, rows: np.ndarray, key: str) -> np.ndarray:
  """`key` of the global rows `rows`, in that order (reads only the shards that hold them)."""
  rows = np.asarray(rows)
  out = None
  for j in np.unique(rows // shard_size):
    data = sample_shards.read_shard(sample_shards.shard_path(directory, int(j)), [key])[key]
    mask = rows // shard_size == j
    if out is None:
      out = np.empty((len(rows), *data.shape[1:]), data.dtype)
    out[mask] = data[rows[mask] - j * shard_size]
  return out


def check_config(config) -> None:
  """The generators and metric inputs of `config.evaluate`; `fae_jax.config_checks` runs it
  before any stage."""
  ev = config.evaluate
  unknown = [g for g in ev.generators if g not in GENERATORS]
  if unknown:
    raise ValueError(
      f"config.evaluate.generators: unknown generator(s) {unknown}; choose from "
      f"{tuple(GENERATORS)}."
    )
  if ev.inception_dir and not ev.reference_npz:
    raise ValueError(
      "config.evaluate.inception_dir is set but config.evaluate.reference_npz is empty: give "
      "the ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) to compute FID against."
    )


def run(ctx: StageContext) -> dict:
  config = ctx.config
  ev = config.evaluate
  check_config(config)  # before any work (main also runs it before the first stage)
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
  shard_size = int(ev.samples_per_shard)
  sharding.check_batch_divisible(bs, sampling_mesh(), "config.evaluate.batch_size")
  labels = balanced_labels(n, num_classes)

  logging.info("evaluate: held-out features and reconstructions, the train-split floor")
  held = held_out(ctx, ae, n, bs, shard_size)
  real_eval = held["real"]
  m = len(real_eval)
  real_train, real_train_y = real_pooled_features(
    ctx, ae, "train", max(n, int(ev.probe_train_examples)), bs
  )
  floor = fd(real_train[:m], real_eval)
  probe = linear_probe.train_linear_probe(
    real_train,
    real_train_y,
    num_classes,
    l2=float(ev.probe_l2),
    steps=int(ev.probe_steps),
    seed=config.seed,
  )
  metrics: dict[str, Any] = {
    "real": {
      "fd_dinov2_floor": floor,
      "num_samples": int(m),
      "probe_train_examples": int(len(real_train_y)),
      "probe_top1_eval": float(linear_probe.probe_accuracy(probe, real_eval, held["label"])),
    },
    "recon": dinov2_metrics(probe, real_eval, held["recon"], held["label"]),
  }
  if "recon_noisy" in held:
    noisy = dinov2_metrics(probe, real_eval, held["recon_noisy"], held["label"], "_noisy")
    metrics["recon"].update(noisy)

  inception = reference = None
  if ev.inception_dir:
    params, _ = load_inception(ev.inception_dir)
    inception = inception_features.inception_feature_fn(params, bs)
    logging.info("evaluate: Inception activations of the reference %s", ev.reference_npz)
    ref_stats, ref_acts = adm_npz.load_reference(ev.reference_npz, inception, bs)
    reference = (ref_stats, None if ref_acts is None else ref_acts["pool3"])

  writer = metric_writers.create_default_writer(str(out_dir), just_logging=jax.process_index() > 0)
  rng = jax.random.key(config.seed)
  for generator in ev.generators:
    runs, stats, samplers = GENERATORS[generator](
      ctx.config, artifacts.export_dir(ctx.input_root(generator), generator)
    )
    res: dict[str, Any] = {}
    for which, name, make_sample_fn in runs:
      key = name if which == "trained" else which
      with_inception = inception is not None and which == "trained"
      directory = out_dir / f"{generator}_{key}"
      sample_shards.check_plan(
        directory,
        {
          "generator": generator,
          "which": which,
          "setting": samplers[name],
          "export_step": export_step(ctx, generator),
          "num_samples": n,
          "num_classes": num_classes,
          "shard_size": shard_size,
          "batch_size": bs,
          "seed": int(config.seed),
        },
      )
      logging.info("evaluate: %s %s %s samples (%s)", n, generator, which, name)
      make = sample_shard_fn(
        make_sample_fn,
        ae,
        stats,
        labels,
        jax.random.fold_in(rng, 7),
        bs,
        inception if with_inception else None,
      )
      sample_shards.fill_shards(directory, n, shard_size, make, name=f"evaluate {generator} {key}")
      if with_inception:  # shards written before `inception_dir` was set get them now
        add_inception(directory, n, shard_size, inception, bs)
      multihost.barrier(f"evaluate-samples:{generator}_{key}")
      keys = [adm_npz.LABELS_KEY, "dinov2", *(INCEPTION_KEYS if with_inception else ())]
      got = sample_shards.read_shards(directory, n, shard_size, keys)
      if not np.array_equal(got[adm_npz.LABELS_KEY], labels):
        raise ValueError(f"{directory}: the shards' labels are not the balanced labels.")
      if which == "untrained":
        res["fd_dinov2_untrained"] = fd(got["dinov2"], real_eval)
        continue
      for k, v in dinov2_metrics(probe, real_eval, got["dinov2"], labels, f"_{name}").items():
        res[k] = v
      if with_inception:
        table = generative.adm_metrics(
          {k: got[k] for k in INCEPTION_KEYS}, *reference, block_size=generative.DEFAULT_BLOCK
        )
        res.update({f"{k}_{name}": v for k, v in table.items() if v is not None})
      npz_path = out_dir / f"{generator}_{name}.npz"
      png_path = out_dir / f"{generator}_{name}.png"
      if multihost.is_primary():
        if not npz_path.exists():
          write_samples_npz(directory, n, shard_size, npz_path, labels)
        per_class = int(ev.grid_per_class)
        pick = np.concatenate([np.nonzero(labels == c)[0][:per_class] for c in range(num_classes)])
        images = shard_rows(directory, shard_size, pick, adm_npz.IMAGES_KEY)
        grid = grids.make_grid(grids.upscale_nearest(images, int(ev.grid_upscale)), cols=per_class)
        grids.save_png(png_path, grid)
        grids.write_grid_to_tensorboard(writer, 0, f"{generator}/{name}", grid)
      res[f"samples_npz_{name}"] = str(npz_path)
      res[f"grid_png_{name}"] = str(png_path)
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
    for key in ("fd_dinov2_guided", "class_consistency_guided", "fid_guided"):
      if key in metrics[generator]:
        summary[f"{generator}.{key}"] = metrics[generator][key]
  return summary
