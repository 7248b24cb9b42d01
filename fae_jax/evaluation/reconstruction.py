"""Held-out reconstruction metrics of a trained run's decoding paths (the `pixel` stage's report).

PSNR and SSIM on uint8 images at the data resolution (as saved) and rFD-DINOv2 (Frechet distance
between the frozen encoder's mean-pooled features of the reconstructions and of the originals,
float64 eigendecomposition), per path:
  * 'full': image -> encoder -> FAE posterior MEAN -> feature decoder -> pixel decoder;
  * 'features': the pixel decoder on the clean encoder features.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from fae_jax.data import pipeline
from fae_jax.evaluation import frechet, grids, image_metrics
from fae_jax.inference import InferenceFns

# Grids of small images are enlarged (nearest neighbour) to about this many pixels per side.
_GRID_MIN_SIDE = 112


@dataclasses.dataclass
class _PathStats:
  psnr: list
  ssim: list
  fd: frechet.StatsAccumulator | None
  grid: list


def evaluate_reconstructions(
  config: ml_collections.ConfigDict,
  fns: InferenceFns,
  *,
  encoder_params: Any,
  paths: dict[str, tuple[str, Any]],
  fae_params: Any = None,
  rfd_paths: tuple[str, ...] = (),
  grid_images: int = 0,
) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """Held-out reconstruction metrics of several decoding paths.

  Args:
    config: the experiment config (`data`, and `pixel.eval`: batch size, example limit).
    fns: `make_inference_fns(...)`.
    encoder_params: frozen encoder weights.
    paths: name -> (kind, decoder params), kind 'features' (decoder on the clean encoder
      features) or 'full' (encoder -> FAE posterior mean -> feature decoder -> decoder).
    fae_params: the FAE's weights (for 'full' paths).
    rfd_paths: the paths whose rFD-DINOv2 to compute (one more encoder forward per image).
    grid_images: how many (original, reconstruction) pairs to return per path.

  Returns:
    `(metrics, grids)`: `{f'psnr_{name}', f'ssim_{name}', f'rfd_dinov2_{name}' (rfd_paths),
    'eval_examples'}` and `{name: (originals, reconstructions)}` uint8 arrays.
  """
  cfg = config.pixel.eval
  bs = int(cfg.batch_size)
  limits = [int(v) for v in (cfg.get("max_examples"), config.data.max_eval_examples) if v]
  ds = pipeline.make_ordered_dataset(
    config.data,
    config.data.eval_split,
    batch_size=bs,
    end_index=min(limits) if limits else None,
    process_index=0,
    process_count=1,
  )
  stats = {
    name: _PathStats([], [], frechet.StatsAccumulator() if name in rfd_paths else None, [])
    for name in paths
  }
  real_fd = frechet.StatsAccumulator() if any(name in rfd_paths for name in paths) else None
  originals, count = [], 0
  for batch in ds:
    keep = np.asarray(batch["valid"]).astype(bool)
    if not keep.any():
      continue
    images = np.asarray(batch["image"])  # padded batches keep one static shape: one compile
    feats = fns.features(encoder_params, images)
    latents = None
    if real_fd is not None:
      real_fd.update(np.asarray(frechet.fd_features(feats))[keep])
    real = images[keep]
    if sum(len(o) for o in originals) < grid_images:
      originals.append(real)
    for name, (kind, decoder_params) in paths.items():
      if kind == "features":
        recon = fns.decode_features(decoder_params, feats)
      else:
        if latents is None:
          latents = fns.encode(fae_params, feats)
        recon = fns.decode(fae_params, decoder_params, latents)
      s = stats[name]
      if s.fd is not None:
        s.fd.update(np.asarray(frechet.fd_features(fns.features(encoder_params, recon)))[keep])
      recon = np.asarray(recon)[keep]
      s.psnr.append(image_metrics.psnr(real, recon))
      s.ssim.append(image_metrics.ssim(real, recon))
      if sum(len(g) for g in s.grid) < grid_images:
        s.grid.append(recon)
    count += int(keep.sum())
  if count == 0:
    raise ValueError(f"pixel: no readable held-out image in split {config.data.eval_split!r}.")
  metrics: dict[str, float] = {"eval_examples": count}
  out_grids = {}
  real_stats = real_fd.finalize() if real_fd is not None and count > 1 else None
  for name, s in stats.items():
    metrics[f"psnr_{name}"] = float(np.mean(np.concatenate(s.psnr)))
    metrics[f"ssim_{name}"] = float(np.mean(np.concatenate(s.ssim)))
    if real_stats is not None and s.fd is not None:
      metrics[f"rfd_dinov2_{name}"] = frechet.frechet_distance(real_stats, s.fd.finalize())
    if grid_images:
      out_grids[name] = (
        np.concatenate(originals)[:grid_images],
        np.concatenate(s.grid)[:grid_images],
      )
  return metrics, out_grids


def reconstruction_grid(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """Originals next to reconstructions, 8 pairs a row, small images enlarged (nearest)."""
  upscale = max(1, -(-_GRID_MIN_SIDE // int(originals.shape[1])))
  return grids.side_by_side(originals, recons, pairs_per_row=8, upscale=upscale)
