"""The ADM evaluator's `.npz` files (openai/guided-diffusion `evaluations/`).

Two kinds, both plain `numpy.savez` archives:
  * sample batches: `arr_0` uint8 `[N, H, W, 3]` images (NHWC, RGB); generation scripts often add
    the class labels as `arr_1` `[N]`;
  * reference batches (e.g. `VIRTUAL_imagenet256_labeled.npz`): `arr_0` images (10K for
    ImageNet, used for precision/recall) plus the statistics of the whole reference set: `mu`
    `[2048]`, `sigma` `[2048, 2048]` (pool3) and `mu_s` `[2023]`, `sigma_s` `[2023, 2023]`
    (sFID's spatial features). When a file holds `mu`, the evaluator uses those statistics
    rather than the ones of its `arr_0`.

Reading streams `arr_0` in batches (`iter_images`): a 50K x 256 x 256 x 3 batch is 9.8 GB, so it
is never loaded whole. Writing assembles the archive under a temporary name and renames it, so
a crash never leaves a truncated file with the final name. Paths may be local or `gs://`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from etils import epath

from fae_jax.evaluation.frechet import FeatureStats, StatsAccumulator

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """FID statistics (`pool`, from `mu`/`sigma`) and sFID statistics (`spatial`, `mu_s`/`sigma_s`)."""

  pool: FeatureStats
  spatial: FeatureStats


def _tmp_path(path: epath.Path) -> epath.Path:
  return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_path(path)
  with tmp.open("wb") as f:
    np.savez(f, **arrays)
  tmp.replace(path)


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f"{what}: ADM sample batches hold uint8 images [N, H, W, 3], got {images.dtype} "
      f"{images.shape}. Convert with fae_jax.evaluation.grids.to_uint8."
    )
  return images


def write_samples(
  path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None
) -> None:
  """Writes a sample batch: `arr_0` = uint8 `[N, H, W, 3]`, `arr_1` = labels `[N]` if given."""
  arrays = {IMAGES_KEY: _check_images(images, f"write_samples({path})")}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (arrays[IMAGES_KEY].shape[0],):
      raise ValueError(f"write_samples: labels {labels.shape} do not match {len(images)} images.")
    arrays[LABELS_KEY] = labels
  _write_npz(path, arrays)


def write_samples_streamed(
  path: str | os.PathLike,
  batches: Iterable[np.ndarray],
  image_shape: tuple[int, int, int],
  labels: np.ndarray,
) -> None:
  """Writes a sample batch from uint8 image batches, never holding all images in memory.

  The same file as `write_samples(path, concatenate(batches), labels)` (50K images at 256 px
  are 9.8 GB; this streams them into the archive's `arr_0` one batch at a time). Written under
  a temporary name and renamed.

  Args:
    batches: uint8 `[b_i, *image_shape]` arrays whose sizes add up to `len(labels)`.
    image_shape: `(H, W, 3)`.
    labels: `[N]`, stored as `arr_1`.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  labels = np.asarray(labels)
  n = len(labels)
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
  header["shape"] = (n, *image_shape)
  tmp = _tmp_path(path)
  written = 0
  with tmp.open("wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
    with z.open(f"{IMAGES_KEY}.npy", "w", force_zip64=True) as arr:
      np.lib.format.write_array_header_2_0(arr, header)
      for batch in batches:
        batch = _check_images(batch, f"write_samples_streamed({path})")
        if batch.shape[1:] != tuple(image_shape) or written + len(batch) > n:
          raise ValueError(
            f"write_samples_streamed({path}): batch {batch.shape} does not fit images "
            f"{tuple(image_shape)} x {n} (after {written})."
          )
        arr.write(np.ascontiguousarray(batch).tobytes())
        written += len(batch)
    if written != n:
      raise ValueError(f"write_samples_streamed({path}): got {written} images for {n} labels.")
    with z.open(f"{LABELS_KEY}.npy", "w") as arr:
      np.lib.format.write_array(arr, labels)
  tmp.replace(path)


def write_reference(
  path: str | os.PathLike, stats: ReferenceStats, images: np.ndarray | None = None
) -> None:
  """Writes reference statistics (`mu`, `sigma`, `mu_s`, `sigma_s`, float64) and optionally the
  images (`arr_0`) used for precision/recall, in the layout of the ADM reference batches."""
  arrays = {
    "mu": stats.pool.mean,
    "sigma": stats.pool.cov,
    "mu_s": stats.spatial.mean,
    "sigma_s": stats.spatial.cov,
  }
  if images is not None:
    arrays[IMAGES_KEY] = _check_images(images, f"write_reference({path})")
  _write_npz(path, arrays)


def _require(path: str | os.PathLike) -> epath.Path:
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"No .npz file at {path}.")
  return path


def keys(path: str | os.PathLike) -> list[str]:
  """The array names in the archive (without `.npy`)."""
  with _require(path).open("rb") as f, zipfile.ZipFile(f) as z:
    return [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]


def read_reference(path: str | os.PathLike) -> ReferenceStats:
  """Reads `mu`, `sigma`, `mu_s`, `sigma_s` (an ADM reference batch or `write_reference`)."""
  path = _require(path)
  with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
    missing = [k for k in STATS_KEYS if k not in data.files]
    if missing:
      raise KeyError(
        f"{path} lacks the statistics key(s) {missing} (it has {data.files}); a reference "
        f"needs {list(STATS_KEYS)}, or images under '{IMAGES_KEY}' to compute them from."
      )
    return ReferenceStats(
      pool=FeatureStats(mean=data["mu"], cov=data["sigma"]),
      spatial=FeatureStats(mean=data["mu_s"], cov=data["sigma_s"]),
    )


@contextlib.contextmanager
def _open_array(path: str | os.PathLike, key: str):
  """Yields `(file positioned at the array data, shape, dtype)` of `key` in the archive."""
  path = _require(path)
  with path.open("rb") as f, zipfile.ZipFile(f) as z:
    name = f"{key}.npy"
    if name not in z.namelist():
      names = [n[: -len(".npy")] for n in z.namelist()]
      raise KeyError(
        f"{path} has no '{key}' array (it has {names}); an ADM sample batch stores its uint8 "
        f"images as '{IMAGES_KEY}'."
      )
    with z.open(name) as arr:
      version = np.lib.format.read_magic(arr)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(arr)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(arr)
      else:
        raise ValueError(f"{path}:{key} uses .npy format {version}; expected 1.0 or 2.0.")
      if fortran or dtype.hasobject:
        raise ValueError(f"{path}:{key} is Fortran-ordered or an object array; rewrite it.")
      yield arr, shape, dtype


def image_shape(path: str | os.PathLike) -> tuple[int, ...]:
  """`(N, H, W, 3)` of `arr_0`, read from the header only."""
  with _open_array(path, IMAGES_KEY) as (_, shape, dtype):
    _check_images(np.empty((0, *shape[1:]), dtype), f"{path}")
    return tuple(shape)


def iter_images(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
  """Streams `arr_0` as uint8 batches `[<= batch_size, H, W, 3]`, in file order."""
  if batch_size < 1:
    raise ValueError(f"iter_images: batch_size must be >= 1, got {batch_size}.")
  with _open_array(path, IMAGES_KEY) as (arr, shape, dtype):
    _check_images(np.empty((0, *shape[1:]), dtype), f"{path}")
    per_image = int(np.prod(shape[1:])) * dtype.itemsize
    for start in range(0, shape[0], batch_size):
      count = min(batch_size, shape[0] - start)
      data = arr.read(count * per_image)
      if len(data) != count * per_image:
        raise ValueError(f"{path}: '{IMAGES_KEY}' ends early (truncated file?) at image {start}.")
      yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


def read_images(path: str | os.PathLike) -> np.ndarray:
  """All of `arr_0` in memory (small files and tests; use `iter_images` for 50K batches)."""
  return np.concatenate(list(iter_images(path, 4096)), axis=0)


FeatureFn = Callable[[np.ndarray], dict[str, np.ndarray]]


def batch_activations(
  path: str | os.PathLike, feature_fn: FeatureFn, batch_size: int
) -> dict[str, np.ndarray]:
  """Runs `feature_fn` over the images of a batch file; concatenates each output `[N, ...]`.

  Args:
    path: sample or reference batch with `arr_0`.
    feature_fn: uint8 `[B, H, W, 3]` -> `{name: [B, ...]}` (e.g. the FID Inception's
      `pool3`, `spatial`, `logits_unbiased`).
    batch_size: images per call (the last call may get fewer).
  """
  out: dict[str, list[np.ndarray]] = {}
  for batch in iter_images(path, batch_size):
    for name, value in feature_fn(batch).items():
      out.setdefault(name, []).append(np.asarray(value))
  if not out:
    raise ValueError(f"{path}: '{IMAGES_KEY}' holds no images.")
  return {name: np.concatenate(parts, axis=0) for name, parts in out.items()}


def reference_stats_from_activations(activations: dict[str, np.ndarray]) -> ReferenceStats:
  """`ReferenceStats` of `pool3` and `spatial` activations, as the ADM evaluator computes them
  (`np.mean`, `np.cov(rowvar=False)`), accumulated in float64."""
  stats = {}
  for name in ("pool3", "spatial"):
    if name not in activations:
      raise KeyError(f"reference_stats_from_activations: no '{name}' in {sorted(activations)}.")
    acc = StatsAccumulator()
    acc.update(activations[name])
    stats[name] = acc.finalize()
  return ReferenceStats(pool=stats["pool3"], spatial=stats["spatial"])


def load_reference(
  path: str | os.PathLike, feature_fn: FeatureFn, batch_size: int
) -> tuple[ReferenceStats, dict[str, np.ndarray] | None]:
  """A reference batch's statistics and, when it holds images, their activations.

  As the ADM evaluator: the stored `mu`, `sigma`, `mu_s`, `sigma_s` when present, else the
  statistics of its `arr_0` images. The activations (for precision/recall) are None for a
  statistics-only file.

  Raises:
    KeyError: the file has neither statistics nor images.
  """
  names = set(keys(path))
  has_stats = set(STATS_KEYS) <= names
  has_images = IMAGES_KEY in names
  if not (has_stats or has_images):
    raise KeyError(
      f"Reference {path} has neither the statistics {list(STATS_KEYS)} nor images "
      f"'{IMAGES_KEY}' (it has {sorted(names)}); pass an ADM reference batch."
    )
  acts = batch_activations(path, feature_fn, batch_size) if has_images else None
  stats = read_reference(path) if has_stats else reference_stats_from_activations(acts)
  return stats, acts
