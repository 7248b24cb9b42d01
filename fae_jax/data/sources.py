"""Random-access data sources for grain: Fashion-MNIST IDX files, image folders, TFDS, synthetic.

Every source has `__len__` and `__getitem__(i)` returning one record::

  {"image": uint8 [H, W, 3], "label": int32 [], "id": int64 []}

`image` is RGB (grayscale sources are repeated to 3 channels) at the source's native size (the
pipeline crops/resizes); `id` is the record's index in the split, stable across runs, so caches
built from a source can be checked against it.

A source may return `None` for a record it cannot decode (a corrupt file in an image folder).
grain propagates `None` through `map` and drops it when the dataset becomes an `IterDataset`,
so the training pipeline skips the record; the source logs the file name once and counts it
(`ImageFolderSource.num_skipped`). The ordered pipeline (feature cache) keeps the slot and marks
it invalid instead, so cached indices stay aligned with the split.
"""

from __future__ import annotations

import gzip
import os
import threading
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

Record = dict[str, np.ndarray]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
# IDX files of the Debian package `dataset-fashion-mnist`, by split name.
_FASHION_MNIST_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
VALID_NAMES = ("fashion_mnist_idx", "tfds:<name>", "image_folder", "synthetic")


def _make_record(image: np.ndarray, label: Any, index: int) -> Record:
  """Builds the shared record format; `image` is [H, W], [H, W, 1] or [H, W, 3]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Expected an [H, W, 1|3] image, got shape {image.shape} (record {index}).")
  return {
    "image": np.ascontiguousarray(image, dtype=np.uint8),
    "label": np.asarray(label, dtype=np.int32),
    "id": np.asarray(index, dtype=np.int64),
  }


def _check_index(index: int, length: int) -> int:
  index = int(index)
  if not 0 <= index < length:
    raise IndexError(f"Index {index} out of range for a source of {length} records.")
  return index


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files.


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into an array of its declared shape.

  Format: magic = two zero bytes, a type code, the number of dims; then one big-endian uint32
  per dim; then the data, C-order.

  Args:
    path: file path; `.gz` files are decompressed.

  Returns:
    An array with the declared shape, in native byte order.
  """
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r}).")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}.")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated IDX header.")
  dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(
      f"{path}: IDX dims {dims} need {expected} bytes of data, file has {len(data) - header}."
    )
  array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
  return array.astype(dtype.newbyteorder("="), copy=False)


class FashionMnistSource:
  """Fashion-MNIST (28x28 grayscale, 10 classes) from the Debian `dataset-fashion-mnist` files.

  Splits: `train` (60000) and `test` (10000). The IDX files are decompressed once and kept in
  memory (47 MB for `train`); images are repeated to RGB per record.
  """

  def __init__(self, split: str, data_dir: str | os.PathLike[str] | None = None):
    data_dir = os.fspath(data_dir or FASHION_MNIST_DIR)
    if split not in _FASHION_MNIST_FILES:
      raise ValueError(
        f"Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}, got split={split!r}."
      )
    image_file, label_file = (os.path.join(data_dir, f) for f in _FASHION_MNIST_FILES[split])
    missing = [f for f in (image_file, label_file) if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found: {missing}. Install them with "
        "`sudo apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DIR}), or point `config.data.data_dir` at a directory holding "
        f"{list(_FASHION_MNIST_FILES[split])}."
      )
    self.split = split
    self.data_dir = data_dir
    self._images = read_idx(image_file)  # [N, 28, 28] uint8
    self._labels = read_idx(label_file)  # [N] uint8
    if self._images.ndim != 3 or self._images.dtype != np.uint8:
      raise ValueError(f"{image_file}: expected [N, H, W] uint8, got {self._images.shape}.")
    if self._labels.shape != self._images.shape[:1]:
      raise ValueError(
        f"{label_file}: {self._labels.shape[0]} labels for {self._images.shape[0]} images."
      )

  def __len__(self) -> int:
    return self._images.shape[0]

  def __getitem__(self, index: int) -> Record:
    index = _check_index(index, len(self))
    return _make_record(self._images[index], self._labels[index], index)

  def __repr__(self) -> str:
    return f"FashionMnistSource(split={self.split!r}, data_dir={self.data_dir!r}, n={len(self)})"


# ------------------------------------------------------------------------------------------------
# Image folder.


def list_image_classes(split_dir: str | os.PathLike[str]) -> list[str]:
  """Sorted names of the class subdirectories of `split_dir`."""
  return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


class TooManyCorruptImages(RuntimeError):
  """More undecodable files than `data.max_skipped_images`: the data is likely not what it seems."""


def to_rgb8(img: Any) -> np.ndarray:
  """A PIL image of any mode -> uint8 `[H, W, 3]`.

  Grayscale is repeated over the channels; alpha is dropped (the colour under it is kept, as
  ADM's `convert("RGB")` does); palette and CMYK images are converted by PIL; 16-bit and 32-bit
  integer and float images are scaled to 8 bits from their range (16-bit: x 255 / 65535), where
  PIL's own `convert("RGB")` would clip every value above 255 to white.
  """
  from PIL import Image

  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img, dtype=np.float64)
    if mode == "F":  # float images: [0, 1] if they fit, else taken as [0, 255]
      scale = 255.0 if a.max() <= 1.0 else 1.0
    elif mode == "I":  # 32-bit integer: PIL's container for 16-bit PNGs; 8-bit if it fits
      scale = 255.0 / 65535.0 if a.max() > 255 else 1.0
    else:
      scale = 255.0 / 65535.0
    a8 = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    img = Image.fromarray(a8, mode="L")
  return np.asarray(img.convert("RGB"))


class ImageFolderSource:
  """Images in `root/<split>/<class_name>/*.<ext>`; classes sorted by name give label indices.

  Images are decoded lazily with PIL on access and converted to 8-bit RGB by `to_rgb8`
  (grayscale, RGBA, palette, CMYK and 16-bit images all give uint8 `[H, W, 3]`). A file PIL
  cannot decode (corrupt, or not an image despite its extension) is logged (with its path, once)
  and counted in `num_skipped`, and `__getitem__` returns `None` for it, which grain pipelines
  drop (training) or mark invalid (ordered mode). Past `max_skipped` such files the source raises
  `TooManyCorruptImages` naming them, so a wrong folder does not train on what is left. With
  grain worker processes each worker counts and logs its own skips. Files without an image
  extension are not listed (their count is logged).
  """

  def __init__(
    self,
    root: str | os.PathLike[str],
    split: str,
    class_names: Sequence[str] | None = None,
    max_skipped: int = 100,
  ):
    root = os.fspath(root)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(root):
      raise FileNotFoundError(
        f"Image folder root {root!r} does not exist. Expected layout "
        "root/<split>/<class_name>/<image files>; set `config.data.data_dir` to the root."
      )
    if not os.path.isdir(split_dir):
      present = sorted(e.name for e in os.scandir(root) if e.is_dir())
      raise FileNotFoundError(
        f"Image folder split directory {split_dir!r} does not exist (found splits {present}). "
        "Expected layout root/<split>/<class_name>/<image files>."
      )
    self.root = root
    self.split = split
    self.class_names = tuple(class_names) if class_names else tuple(list_image_classes(split_dir))
    if not self.class_names:
      raise ValueError(f"No class subdirectories in {split_dir!r}.")
    files: list[str] = []
    labels: list[int] = []
    ignored = 0
    for label, name in enumerate(self.class_names):
      class_dir = os.path.join(split_dir, name)
      if not os.path.isdir(class_dir):
        continue  # A split may lack some classes of an explicit `class_names`.
      for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
          files.append(os.path.join(name, entry.name))
          labels.append(label)
        elif entry.is_file():
          ignored += 1
    if ignored:
      logging.info(
        "%s: ignored %d files without an image extension %s.", split_dir, ignored, IMAGE_EXTENSIONS
      )
    self.max_skipped = int(max_skipped)
    if not files:
      raise ValueError(
        f"No images with extensions {IMAGE_EXTENSIONS} under {split_dir!r}/<class_name>/."
      )
    self._files = files
    self._labels = np.asarray(labels, dtype=np.int32)
    self._skipped: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._files)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_skipped(self) -> int:
    """Number of distinct files found corrupt so far (in this process)."""
    with self._lock:
      return len(self._skipped)

  @property
  def skipped_files(self) -> list[str]:
    with self._lock:
      return [self.path(i) for i in sorted(self._skipped)]

  def path(self, index: int) -> str:
    return os.path.join(self.root, self.split, self._files[index])

  def __getitem__(self, index: int) -> Record | None:
    from PIL import Image  # Local: only image folders need PIL at source level.

    index = _check_index(index, len(self))
    path = self.path(index)
    try:
      with Image.open(path) as img:
        image = to_rgb8(img)
      if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image {image.shape}")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      # UnidentifiedImageError and truncated-file errors are OSErrors.
      with self._lock:
        first_time = index not in self._skipped
        self._skipped.add(index)
        count = len(self._skipped)
        skipped = [self.path(i) for i in sorted(self._skipped)[:5]]
      if first_time:
        logging.warning(
          "Skipping corrupt image %s (%s: %s); %d skipped so far.", path, type(e).__name__, e, count
        )
      if count > self.max_skipped:
        raise TooManyCorruptImages(
          f"{count} files under {os.path.join(self.root, self.split)} could not be decoded as "
          f"images (more than data.max_skipped_images={self.max_skipped}), e.g. {skipped}; "
          f"the last: {type(e).__name__}: {e}. Check that data.data_dir is the right folder, "
          "remove or re-download the broken files, or raise --config.data.max_skipped_images."
        ) from e
      return None
    return _make_record(image, self._labels[index], index)

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_lock"]  # Locks do not pickle (grain workers receive the source pickled).
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (
      f"ImageFolderSource(root={self.root!r}, split={self.split!r}, n={len(self)}, "
      f"classes={self.num_classes})"
    )


# ------------------------------------------------------------------------------------------------
# Synthetic.


class SyntheticSource:
  """Deterministic random images for tests and throughput runs: record `i` depends only on
  `(seed, i)`."""

  def __init__(self, num_examples: int, image_size: int, num_classes: int, seed: int = 0):
    if num_examples <= 0 or image_size <= 0 or num_classes <= 0:
      raise ValueError(
        f"SyntheticSource needs positive sizes, got num_examples={num_examples}, "
        f"image_size={image_size}, num_classes={num_classes}."
      )
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.num_classes = int(num_classes)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Record:
    index = _check_index(index, len(self))
    rng = np.random.default_rng([self.seed, index])
    s = self.image_size
    image = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
    label = rng.integers(0, self.num_classes)
    return _make_record(image, label, index)

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(num_examples={self.num_examples}, image_size={self.image_size}, "
      f"num_classes={self.num_classes}, seed={self.seed})"
    )


# ------------------------------------------------------------------------------------------------
# TFDS.


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  if name.startswith("imagenet2012"):
    return (
      f"ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
      f"ILSVRC2012_img_val.tar in a directory MANUAL_DIR, then run `tfds build {name} "
      f"--file_format=array_record --manual_dir=MANUAL_DIR --data_dir={data_dir}`."
    )
  return (
    f"Prepare it with `tfds build {name} --file_format=array_record --data_dir={data_dir}` "
    "(random access needs the array_record format)."
  )


class TfdsSource:
  """A TFDS dataset through `tfds.data_source` (ArrayRecord random access, no TensorFlow).

  Never downloads or prepares data: an unprepared dataset raises `FileNotFoundError` naming the
  dataset, the directory looked in and the `tfds build` command that prepares it.
  """

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    image_key: str = "image",
    label_key: str = "label",
  ):
    import tensorflow_datasets as tfds  # Heavy import, only for TFDS sources.

    self.name = name
    self.split = split
    self.data_dir = os.fspath(data_dir) if data_dir else None
    self.image_key = image_key
    self.label_key = label_key
    try:
      self._source = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
    except Exception as e:  # tfds raises several unrelated types here; we re-diagnose below.
      builder = tfds.builder(name, data_dir=self.data_dir)
      looked_in = os.fspath(builder.data_dir)
      root = self.data_dir or os.path.dirname(os.path.dirname(looked_in.rstrip("/")))
      if not builder.is_prepared():
        raise FileNotFoundError(
          f"TFDS dataset {name!r} is not prepared in {looked_in!r} "
          f"(data_dir={self.data_dir or 'TFDS default'}). {_tfds_prepare_hint(name, root)}"
        ) from e
      if isinstance(e, NotImplementedError):
        raise FileNotFoundError(
          f"TFDS dataset {name!r} in {looked_in!r} is not in array_record format, which random "
          f"access needs. {_tfds_prepare_hint(name, root)}"
        ) from e
      raise

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    index = _check_index(index, len(self))
    example = self._source[index]
    return _make_record(example[self.image_key], example[self.label_key], index)

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})"


# ------------------------------------------------------------------------------------------------
# Factory.


def make_source(data_config: ml_collections.ConfigDict, split: str):
  """Builds the source named by `data_config.name` for `split`.

  Fields read: `name` ("fashion_mnist_idx" | "tfds:<name>" | "image_folder" | "synthetic"),
  `data_dir` (IDX directory, TFDS data_dir or image-folder root; empty means the default), and
  for "synthetic" `num_examples`, `image_size`, `num_classes`, `seed`; for TFDS optionally
  `image_key`/`label_key` (default "image"/"label"); for "image_folder" `max_skipped_images`
  (undecodable files tolerated before the stage stops, default 100). The split string is
  passed through unchanged (`train`/`test` for Fashion-MNIST, `train`/`validation` for TFDS
  ImageNet, the subdirectory name for an image folder).
  """
  name = data_config.name
  data_dir = data_config.get("data_dir") or None
  if name == "fashion_mnist_idx":
    return FashionMnistSource(split, data_dir=data_dir)
  if name.startswith("tfds:") and len(name) > len("tfds:"):
    return TfdsSource(
      name[len("tfds:") :],
      split,
      data_dir=data_dir,
      image_key=data_config.get("image_key", "image"),
      label_key=data_config.get("label_key", "label"),
    )
  if name == "image_folder":
    if not data_dir:
      raise ValueError("data.name='image_folder' needs `config.data.data_dir` (the root folder).")
    return ImageFolderSource(
      data_dir, split, max_skipped=data_config.get("max_skipped_images", 100)
    )
  if name == "synthetic":
    image_size = data_config.get("synthetic_image_size") or data_config.get("image_size")
    if not image_size:
      raise ValueError("data.name='synthetic' needs `data.image_size` (or synthetic_image_size).")
    return SyntheticSource(
      num_examples=data_config.num_examples,
      image_size=image_size,
      num_classes=data_config.num_classes,
      seed=data_config.get("seed", 0),
    )
  raise ValueError(f"Unknown dataset name {name!r}; valid names: {', '.join(VALID_NAMES)}.")


def num_classes(data_config: ml_collections.ConfigDict) -> int:
  """Number of label classes of the dataset `data_config` describes."""
  name = data_config.name
  if name == "fashion_mnist_idx":
    return len(FASHION_MNIST_CLASSES)
  if name == "synthetic":
    return int(data_config.num_classes)
  if name == "image_folder":
    train_split = data_config.get("train_split", "train")
    return len(list_image_classes(os.path.join(data_config.data_dir, train_split)))
  if name.startswith("tfds:"):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name[len("tfds:") :], data_dir=data_config.get("data_dir") or None)
    return int(builder.info.features[data_config.get("label_key", "label")].num_classes)
  raise ValueError(f"Unknown dataset name {name!r}; valid names: {', '.join(VALID_NAMES)}.")
