"""Cached encoder features paired with the images they were computed from (pixel-decoder data)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fae_jax.data import array_cache, pipeline


class PairedCacheSource:
  """Cached features of the `encode` stage, each with the image it was computed from.

  `source[i] = {'features': [N, D], 'image': uint8 [H, W, 3], 'valid': uint8}`; the image is the
  record `id` of the dataset split (centre-cropped like the pipelines), so features and target
  always belong together. Picklable (grain workers) because both sources are.
  """

  def __init__(self, cache: array_cache.CacheSource, images: Any, image_size: int | None):
    self.cache = cache
    self.images = images
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.cache)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    record = self.cache[index]
    valid = bool(record.get("valid", 1))
    image = self.images[int(record["id"])] if valid else None
    if image is None:
      return {"features": record["features"], "image": None, "valid": np.uint8(0)}
    return {
      "features": record["features"],
      "image": pipeline.center_crop_adm(image["image"], self.image_size),
      "valid": np.uint8(1),
    }
