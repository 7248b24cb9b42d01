"""Tests for fae_jax.data.sources and fae_jax.data.pipeline (tiny images, CPU, fast)."""

import gzip
import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from fae_jax.data import pipeline, sources

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _synthetic_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      "name": "synthetic",
      "data_dir": "",
      "num_examples": 20,
      "image_size": 8,
      "num_classes": 3,
      "seed": 0,
      "random_flip": False,
      "num_workers": 0,
      "read_threads": 2,
      "prefetch_buffer_size": 8,
    }
  )
  config.update(overrides)
  return config


def _ids(batches) -> list[int]:
  return [int(i) for b in batches for i in b["id"]]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


# ------------------------------------------------------------------------------------------------
# IDX / Fashion-MNIST.


def _write_idx(path, array: np.ndarray, type_code: int = 0x08):
  header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_parses_header_and_data(tmp_path):
  images = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
  _write_idx(tmp_path / "a.gz", images)
  np.testing.assert_array_equal(sources.read_idx(tmp_path / "a.gz"), images)
  # A big-endian int32 file comes back in native order with its values intact.
  ints = np.array([[1, -2], [70000, 3]], np.int32)
  _write_idx(tmp_path / "b.gz", ints, type_code=0x0C)
  np.testing.assert_array_equal(sources.read_idx(tmp_path / "b.gz"), ints)


def test_read_idx_rejects_bad_files(tmp_path):
  with gzip.open(tmp_path / "magic.gz", "wb") as f:
    f.write(b"\x01\x00\x08\x01" + np.array([2], ">u4").tobytes() + b"\x00\x00")
  with pytest.raises(ValueError, match="magic"):
    sources.read_idx(tmp_path / "magic.gz")
  with gzip.open(tmp_path / "short.gz", "wb") as f:
    f.write(b"\x00\x00\x08\x01" + np.array([3], ">u4").tobytes() + b"\x00\x00")
  with pytest.raises(ValueError, match="need 3 bytes"):
    sources.read_idx(tmp_path / "short.gz")


def test_fashion_mnist_source_on_tiny_idx(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
  labels = np.array([0, 9, 3, 3, 1, 7], np.uint8)
  _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
  _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
  source = sources.FashionMnistSource("test", data_dir=tmp_path)
  assert len(source) == 6
  record = source[4]
  assert record["image"].shape == (28, 28, 3) and record["image"].dtype == np.uint8
  for c in range(3):  # Grayscale repeated to RGB.
    np.testing.assert_array_equal(record["image"][..., c], images[4])
  assert record["label"].dtype == np.int32 and int(record["label"]) == 1
  assert record["id"].dtype == np.int64 and int(record["id"]) == 4
  with pytest.raises(IndexError):
    source[6]


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    sources.FashionMnistSource("train", data_dir=tmp_path)
  with pytest.raises(ValueError, match="splits"):
    sources.FashionMnistSource("validation", data_dir=tmp_path)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
  for split, size, prefix in (("train", 60000, "train"), ("test", 10000, "t10k")):
    source = sources.FashionMnistSource(split)
    assert len(source) == size
    labels = sources.read_idx(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
    assert labels.min() == 0 and labels.max() == 9
    np.testing.assert_array_equal(np.bincount(labels), np.full(10, size // 10))
    record = source[size - 1]
    assert record["image"].shape == (28, 28, 3) and int(record["id"]) == size - 1
  config = ml_collections.ConfigDict({"name": "fashion_mnist_idx", "data_dir": ""})
  assert sources.num_classes(config) == 10


# ------------------------------------------------------------------------------------------------
# Image folder.


def _make_image_folder(root) -> dict[str, np.ndarray]:
  """Writes root/train/{cat,dog}/ with 3 good images each (varied sizes) and one corrupt file."""
  rng = np.random.default_rng(1)
  written = {}
  for cls, shapes in (("cat", [(12, 10), (9, 16), (10, 10)]), ("dog", [(16, 12), (8, 8), (11, 9)])):
    os.makedirs(root / "train" / cls)
    for j, (h, w) in enumerate(shapes):
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(image).save(root / "train" / cls / f"{j}.png")
      written[f"{cls}/{j}.png"] = image
  (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  (root / "train" / "dog" / "notes.txt").write_text("not an image extension: ignored")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "train" / "dog" / "gray.png")
  return written


def test_image_folder_labels_and_corrupt_file_counted(tmp_path, monkeypatch):
  written = _make_image_folder(tmp_path)
  warnings = []
  monkeypatch.setattr(sources.logging, "warning", lambda *args: warnings.append(args))
  source = sources.ImageFolderSource(tmp_path, "train")
  assert source.class_names == ("cat", "dog")
  assert len(source) == 8  # 3 + broken in cat, 3 + gray in dog; notes.txt ignored.
  records = [source[i] for i in range(len(source))]
  corrupt = [i for i, r in enumerate(records) if r is None]
  assert corrupt == [3] and source.path(3).endswith("cat/broken.jpg")
  assert source.num_skipped == 1 and source.skipped_files == [source.path(3)]
  assert len(warnings) == 1 and source.path(3) in warnings[0]
  source[3]  # A second read is neither recounted nor relogged.
  assert source.num_skipped == 1 and len(warnings) == 1
  labels = {source.path(i)[len(str(tmp_path)) + 7 :]: r for i, r in enumerate(records) if r}
  for name, image in written.items():
    np.testing.assert_array_equal(labels[name]["image"], image)
    assert int(labels[name]["label"]) == (0 if name.startswith("cat") else 1)
  assert labels["dog/gray.png"]["image"].shape == (8, 8, 3)


def test_image_folder_pipeline_skips_corrupt(tmp_path, monkeypatch):
  _make_image_folder(tmp_path)
  monkeypatch.setattr(sources.logging, "warning", lambda *args: None)
  config = _synthetic_config(name="image_folder", data_dir=str(tmp_path), image_size=6)
  source = sources.make_source(config, "train")
  ds = pipeline.make_dataset(
    config, "train", batch_size=2, seed=0, shuffle=True, num_epochs=1, drop_remainder=False,
    process_index=0, process_count=1, source=source,
  )  # fmt: skip
  batches = list(ds)
  assert sorted(_ids(batches)) == [0, 1, 2, 4, 5, 6, 7]
  assert all(b["image"].shape[1:] == (6, 6, 3) for b in batches)
  assert source.num_skipped == 1
  ordered = list(
    pipeline.make_ordered_dataset(
      config, "train", batch_size=3, process_index=0, process_count=1, source=source
    )
  )
  ids = np.concatenate([b["id"] for b in ordered])
  valid = np.concatenate([b["valid"] for b in ordered])
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, 5, 6, 7, -1])
  np.testing.assert_array_equal(valid, [1, 1, 1, 0, 1, 1, 1, 1, 0])


def test_image_folder_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nope", "train")
  os.makedirs(tmp_path / "train")
  with pytest.raises(FileNotFoundError, match="found splits"):
    sources.ImageFolderSource(tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# Synthetic, factory, TFDS.


def test_synthetic_is_deterministic():
  a = sources.SyntheticSource(10, 5, 4, seed=3)
  b = sources.SyntheticSource(10, 5, 4, seed=3)
  c = sources.SyntheticSource(10, 5, 4, seed=4)
  for i in (0, 7):
    _assert_batches_equal([a[i]], [b[i]])
    assert not np.array_equal(a[i]["image"], c[i]["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  assert a[2]["image"].shape == (5, 5, 3) and 0 <= int(a[2]["label"]) < 4
  assert int(a[7]["id"]) == 7


def test_make_source_and_num_classes(tmp_path):
  config = _synthetic_config()
  assert isinstance(sources.make_source(config, "train"), sources.SyntheticSource)
  assert sources.num_classes(config) == 3
  with pytest.raises(ValueError, match="valid names.*fashion_mnist_idx.*tfds:<name>"):
    sources.make_source(_synthetic_config(name="mnist"), "train")
  _make_image_folder(tmp_path)
  assert sources.num_classes(_synthetic_config(name="image_folder", data_dir=str(tmp_path))) == 2


def test_tfds_source_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _synthetic_config(name="tfds:imagenet2012", image_size=8)
  with tfds.testing.mock_data(num_examples=6):
    source = sources.make_source(config, "train")
    assert len(source) == 6
    for i in range(6):
      record = source[i]
      assert record["image"].ndim == 3 and record["image"].shape[-1] == 3
      assert record["image"].dtype == np.uint8 and record["label"].dtype == np.int32
      assert 0 <= int(record["label"]) < 1000 and int(record["id"]) == i
    ds = pipeline.make_dataset(
      config, "train", batch_size=3, seed=0, shuffle=False, num_epochs=1,
      process_index=0, process_count=1, source=source,
    )  # fmt: skip
    batches = list(ds)
    assert _ids(batches) == list(range(6)) and batches[0]["image"].shape == (3, 8, 8, 3)
    gray = sources.TfdsSource("fashion_mnist", "test")  # [28, 28, 1] -> RGB.
    assert gray[0]["image"].shape == (28, 28, 3)
  assert sources.num_classes(config) == 1000


def test_tfds_unprepared_dataset_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as info:
    sources.TfdsSource("imagenet2012", "train", data_dir=tmp_path)
  message = str(info.value)
  assert "imagenet2012" in message and str(tmp_path) in message
  assert "tfds build imagenet2012" in message and "--manual_dir" in message
  assert not any(tmp_path.iterdir())  # Nothing downloaded or prepared.


# ------------------------------------------------------------------------------------------------
# ADM centre crop.


def _box_halve(image: np.ndarray) -> np.ndarray:
  """2x box downsampling [H, W, C] -> [H/2, W/2, C] as PIL does it: a horizontal pass, then a
  vertical pass, each rounded half up to an integer."""
  h, w, c = image.shape
  horizontal = np.floor(image.reshape(h, w // 2, 2, c).mean(axis=2) + 0.5)
  return np.floor(horizontal.reshape(h // 2, 2, w // 2, c).mean(axis=1) + 0.5)


def test_center_crop_adm_box_path_matches_block_means():
  # 40x64 -> BOX halvings to 10x16 (short side 10 == size, so the bicubic step is the identity)
  # -> centre crop columns 3:13.
  image = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
  reference = _box_halve(_box_halve(image.astype(np.float64)))
  out = pipeline.center_crop_adm(image, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, reference[:, 3:13])


def test_center_crop_adm_bicubic_path_matches_torch_antialias():
  torch = pytest.importorskip("torch")
  # 30x50 -> one BOX halving to 15x25 -> antialiased bicubic to 8x13 -> crop columns 2:10.
  image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
  halved = _box_halve(image.astype(np.float64))
  x = torch.from_numpy(halved).permute(2, 0, 1)[None]
  resized = torch.nn.functional.interpolate(
    x, size=(8, 13), mode="bicubic", antialias=True, align_corners=False
  )
  reference = resized[0].permute(1, 2, 0).clamp(0, 255).numpy()
  out = pipeline.center_crop_adm(image, 8)
  assert out.shape == (8, 8, 3)
  np.testing.assert_allclose(out, reference[:, 2:10], atol=1)


def test_center_crop_adm_identity_and_upsampling():
  image = np.random.default_rng(2).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  np.testing.assert_array_equal(pipeline.center_crop_adm(image, 28), image)
  np.testing.assert_array_equal(pipeline.center_crop_adm(image, None), image)
  assert pipeline.center_crop_adm(image[:20], 32).shape == (32, 32, 3)
  constant = np.full((17, 33, 3), 77, np.uint8)
  np.testing.assert_array_equal(pipeline.center_crop_adm(constant, 7), constant[:7, :7])


# ------------------------------------------------------------------------------------------------
# Pipelines.


@pytest.mark.parametrize("num_examples", [10, 11])
def test_process_shards_are_disjoint_and_cover(num_examples):
  config = _synthetic_config(num_examples=num_examples)
  shards = []
  for process_index in range(2):
    ds = pipeline.make_dataset(
      config, "train", batch_size=2, seed=0, shuffle=True, num_epochs=1, drop_remainder=False,
      process_index=process_index, process_count=2,
    )  # fmt: skip
    shards.append(_ids(ds))
  assert len(shards[0]) == len(shards[1]) == num_examples // 2
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0]) | set(shards[1])) == 2 * (num_examples // 2)
  assert set(shards[0]) | set(shards[1]) <= set(range(num_examples))


def test_sub_range_and_batch_contents():
  config = _synthetic_config(num_examples=20)
  source = sources.make_source(config, "train")
  ds = pipeline.make_dataset(
    config, "train", batch_size=4, seed=0, shuffle=False, num_epochs=1,
    process_index=0, process_count=1, start_index=5, end_index=15,
  )  # fmt: skip
  batches = list(ds)
  assert _ids(batches) == list(range(5, 13))  # drop_remainder drops 13, 14.
  b = batches[0]
  assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32 and b["id"].dtype == np.int64
  np.testing.assert_array_equal(b["image"][1], source[6]["image"])


def test_shuffle_differs_per_epoch_and_flip_is_reproducible():
  config = _synthetic_config(num_examples=12, random_flip=True)
  source = sources.make_source(config, "train")
  kwargs = dict(batch_size=12, seed=5, shuffle=True, process_index=0, process_count=1)
  epochs = _take(iter(pipeline.make_dataset(config, "train", **kwargs)), 2)
  again = _take(iter(pipeline.make_dataset(config, "train", **kwargs)), 2)
  _assert_batches_equal(epochs, again)
  first, second = (list(e["id"]) for e in epochs)
  assert sorted(first) == sorted(second) == list(range(12)) and first != second
  flipped = 0
  for batch in epochs:
    for image, i in zip(batch["image"], batch["id"]):
      original = source[int(i)]["image"]
      is_flip = np.array_equal(image, original[:, ::-1])
      assert is_flip or np.array_equal(image, original)
      flipped += is_flip
  assert 0 < flipped < 24


def test_iterator_state_round_trip():
  config = _synthetic_config(num_examples=10, random_flip=True)
  ds = pipeline.make_dataset(
    config, "train", batch_size=4, seed=1, shuffle=True, process_index=0, process_count=1
  )
  it = iter(ds)
  _take(it, 2)  # Stops mid-epoch; the next batches straddle the epoch boundary.
  state = it.get_state()
  expected = _take(it, 4)
  restored = iter(ds)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 4), expected)


def test_iterator_checkpoint_through_orbax(tmp_path):
  config = _synthetic_config(num_examples=10, random_flip=True)
  ds = pipeline.make_dataset(
    config, "train", batch_size=3, seed=2, shuffle=True, process_index=0, process_count=1
  )
  it = iter(ds)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=pipeline.checkpoint_save_args(it)))
    expected = _take(it, 3)  # Advancing after save must not change what was saved.
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    fresh = iter(ds)
    restored = manager.restore(
      manager.latest_step(), args=ocp.args.Composite(data=pipeline.checkpoint_restore_args(fresh))
    )
    assert restored["data"] is fresh
  _assert_batches_equal(_take(fresh, 3), expected)


def test_ordered_mode_covers_range_once_with_padding():
  config = _synthetic_config(num_examples=15, random_flip=True)  # Ordered mode never flips.
  source = sources.make_source(config, "train")
  start, end, batch, count = 2, 13, 2, 2
  per_process = []
  for process_index in range(count):
    ds = pipeline.make_ordered_dataset(
      config, "train", batch_size=batch, start_index=start, end_index=end,
      process_index=process_index, process_count=count,
    )  # fmt: skip
    per_process.append(list(ds))
  num_batches = pipeline.ordered_num_batches(end - start, batch, count)
  assert num_batches == 3 and [len(p) for p in per_process] == [3, 3]
  # Global batches (process batches concatenated in process order) are in index order.
  ids = np.concatenate([b["id"] for k in range(num_batches) for b in (p[k] for p in per_process)])
  valid = np.concatenate(
    [b["valid"] for k in range(num_batches) for b in (p[k] for p in per_process)]
  )
  np.testing.assert_array_equal(ids[valid], np.arange(start, end))
  assert np.all(ids[~valid] == -1) and (~valid).sum() == num_batches * batch * count - (end - start)
  for p in per_process:
    for b in p:
      assert b["image"].shape == (batch, 8, 8, 3) and b["valid"].dtype == bool
      for image, i, ok in zip(b["image"], b["id"], b["valid"]):
        if ok:
          np.testing.assert_array_equal(image, source[int(i)]["image"])


def test_worker_processes_are_checkpointable():
  config = _synthetic_config(num_examples=8, num_workers=1)
  ds = pipeline.make_dataset(
    config, "train", batch_size=2, seed=0, shuffle=True, process_index=0, process_count=1
  )
  it = iter(ds)
  first_epoch = _take(it, 4)
  assert sorted(_ids(first_epoch)) == list(range(8))
  state = it.get_state()
  expected = _take(it, 2)
  it.close()
  restored = iter(ds)
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 2), expected)
  restored.close()
