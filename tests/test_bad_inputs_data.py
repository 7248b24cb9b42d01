"""Bad data (issue 15): missing folders and splits, corrupt and non-image files skipped and
counted up to a limit, grayscale/RGBA/palette/16-bit images, images smaller than the crop."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fae_jax.data import pipeline, sources


def _folder(tmp_path, corrupt: int = 2):
  root = tmp_path / "images"
  cls = root / "train" / "cat"
  cls.mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(cls / "rgb.png")
  Image.fromarray(np.full((20, 20), 77, np.uint8), mode="L").save(cls / "gray.png")
  rgba = np.zeros((20, 20, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
  Image.fromarray(rgba, mode="RGBA").save(cls / "rgba.png")
  Image.fromarray(np.full((20, 20), 3, np.uint8), mode="L").convert("P").save(cls / "palette.png")
  sixteen = np.array([[0, 32768], [65535, 257]], np.uint16).repeat(10, 0).repeat(10, 1)
  Image.fromarray(sixteen).save(cls / "sixteen.png")  # 16-bit grayscale PNG
  Image.fromarray(np.full((4, 6, 3), 9, np.uint8)).save(cls / "tiny.png")  # smaller than the crop
  for i in range(corrupt):
    (cls / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg" * 3)
  (cls / "notes.txt").write_text("not an image")  # ignored: no image extension
  return root


def _records(source):
  return {os.path.basename(source.path(i)): source[i] for i in range(len(source))}


def test_image_modes_become_uint8_rgb(tmp_path):
  source = sources.ImageFolderSource(_folder(tmp_path), "train")
  records = _records(source)
  assert "notes.txt" not in records and len(source) == 8
  for name, record in records.items():
    if name.startswith("broken"):
      assert record is None
      continue
    image = record["image"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
  assert (records["gray.png"]["image"] == 77).all()
  assert (records["rgba.png"]["image"][..., 0] == 200).all()  # alpha dropped, colour kept
  assert (records["palette.png"]["image"] == 3).all()
  sixteen = records["sixteen.png"]["image"][::10, ::10, 0]
  np.testing.assert_array_equal(sixteen, [[0, 128], [255, 1]])  # scaled, not clipped to 255
  assert source.num_skipped == 2
  assert all("broken" in p for p in source.skipped_files)


def test_images_smaller_than_the_crop_are_upscaled(tmp_path):
  config = ml_collections.ConfigDict(
    {"name": "image_folder", "data_dir": str(_folder(tmp_path, corrupt=0)), "image_size": 16}
  )
  ds = pipeline.make_dataset(
    config, "train", batch_size=6, seed=0, shuffle=False, num_epochs=1, process_count=1,
    process_index=0,
  )  # fmt: skip
  (batch,) = list(ds)
  assert batch["image"].shape == (6, 16, 16, 3)


def test_too_many_corrupt_files_stop_with_the_files_named(tmp_path):
  root = _folder(tmp_path, corrupt=3)
  config = ml_collections.ConfigDict(
    {"name": "image_folder", "data_dir": str(root), "max_skipped_images": 2}
  )
  source = sources.make_source(config, "train")
  with pytest.raises(sources.TooManyCorruptImages) as e:
    _records(source)
  message = str(e.value)
  assert "3 files" in message and "broken0.jpg" in message
  assert "max_skipped_images=2" in message and "--config.data.max_skipped_images" in message
  # the files themselves are left alone
  assert (root / "train" / "cat" / "broken0.jpg").exists()


def test_missing_folder_and_split_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist.*config.data.data_dir"):
    sources.ImageFolderSource(tmp_path / "nowhere", "train")
  root = _folder(tmp_path, corrupt=0)
  with pytest.raises(FileNotFoundError, match=r"val.*does not exist \(found splits \['train'\]\)"):
    sources.ImageFolderSource(root, "val")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist|data_dir"):
    sources.FashionMnistSource("train", data_dir=str(tmp_path / "no_idx"))
