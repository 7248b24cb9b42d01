"""Cached encoder features paired with the images they were computed from (pixel-decoder data)."""

from __future__ import annotations

from collections.abc import Sequence
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

  def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """`{'features', 'image', 'valid'}` of examples `indices`, stacked (`pipeline`'s batched
    reader): the features in one read of the cache, the images one by one; an example whose
    feature record or image is invalid has `valid = 0` and a zero image."""
    cached = self.cache.read_batch(indices)
    valid = cached.get("valid", np.ones(len(indices), np.uint8)).astype(bool)
    images = []
    for ok, record_id in zip(valid, cached["id"]):
      image = self.images[int(record_id)] if ok else None
      images.append(
        None if image is None else pipeline.center_crop_adm(image["image"], self.image_size)
      )
    shapes = {im.shape for im in images if im is not None}
    if len(shapes) > 1:
      raise ValueError(f"images of different shapes {sorted(shapes)} in one batch")
    shape = shapes.pop() if shapes else (0, 0, 3)
    blank = np.zeros(shape, np.uint8)
    return {
      "features": cached["features"],
      "image": np.stack([blank if im is None else im for im in images]),
      "valid": np.asarray([im is not None for im in images], np.uint8),
    }
