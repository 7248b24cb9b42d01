"""The convert and encode stages and the main entry point, on tiny random encoders."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath

from configs import common, demo
from fae_jax import artifacts, encoder_checkpoint, main
from fae_jax.convert.encoder import random_params
from fae_jax.data import array_cache, feature_cache
from fae_jax.models.dinov2 import Dinov2Config
from fae_jax.models.encoder import EncoderSpec, encode_images, images_to_model_range

TINY = Dinov2Config(width=32, depth=2, num_heads=2, pos_grid=4, interpolate_offset=0.0)


def tiny_config(num_examples=40, per_shard=16, batch=8):
  config = common.base_config()
  config.data.name = "synthetic"
  config.data.num_examples = num_examples
  config.data.synthetic_image_size = 20
  config.encoder.image_size = 28  # 2 x 2 tokens from a 4 x 4 table: forces the resize
  config.encode.examples_per_shard = per_shard
  config.encode.batch_size = batch
  config.encode.splits = ("train",)
  return config


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  directory = tmp_path_factory.mktemp("enc") / "encoder"
  params = random_params(TINY, seed=3)
  meta = encoder_checkpoint.save_encoder(
    directory, params, TINY, {"path": "random", "sha256": "x", "format": "random", "random": True}
  )
  return directory, params, meta


def _read_all(directory):
  src = array_cache.CacheSource(directory)
  return {k: np.stack([src[i][k] for i in range(len(src))]) for k in src.spec}


def _encode(config, workdir, tiny_encoder, **kwargs):
  _, params, meta = tiny_encoder
  spec = artifacts.encoder_spec(config, TINY)
  return feature_cache.encode_split(
    config, epath.Path(workdir), "train", params=params, spec=spec, encoder_meta=meta, **kwargs
  )


def test_saved_encoder_round_trip(tiny_encoder):
  directory, params, meta = tiny_encoder
  loaded, config, meta2 = encoder_checkpoint.load_encoder(directory)
  assert config == TINY and meta2["fingerprint"] == meta["fingerprint"]
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # Writing over an existing encoder is refused rather than half-overwritten.
  with pytest.raises(FileExistsError):
    encoder_checkpoint.save_encoder(directory, params, TINY, {"sha256": "x"})


def test_cache_holds_the_encoder_output(tmp_path, tiny_encoder):
  config = tiny_config(num_examples=12, per_shard=8)
  _encode(config, tmp_path, tiny_encoder)
  cached = _read_all(feature_cache.cache_dir(tmp_path, "train"))
  from fae_jax.data import sources

  src = sources.make_source(config.data, "train")
  images = np.stack([src[i]["image"] for i in range(12)])
  spec = EncoderSpec(TINY, image_size=28, features="no_affine")
  want = np.asarray(encode_images(spec, tiny_encoder[1], images_to_model_range(images)))
  np.testing.assert_array_equal(cached["id"], np.arange(12))
  np.testing.assert_array_equal(cached["label"], [src[i]["label"] for i in range(12)])
  assert cached["valid"].all()
  # bfloat16 storage: one rounding of values of order 1.
  np.testing.assert_allclose(cached["features"].astype(np.float32), want, atol=0.02, rtol=0.01)
  manifest = array_cache.read_manifest(feature_cache.cache_dir(tmp_path, "train"))
  assert manifest["metadata"]["encoder_fingerprint"] == tiny_encoder[2]["fingerprint"]


def test_sharded_encode_equals_single_device(tmp_path, tiny_encoder):
  config = tiny_config()
  _encode(config, tmp_path / "eight", tiny_encoder, devices=jax.devices())
  _encode(config, tmp_path / "one", tiny_encoder, devices=jax.devices()[:1])
  a = _read_all(feature_cache.cache_dir(tmp_path / "eight", "train"))
  b = _read_all(feature_cache.cache_dir(tmp_path / "one", "train"))
  np.testing.assert_array_equal(a["id"], b["id"])
  np.testing.assert_allclose(
    a["features"].astype(np.float32), b["features"].astype(np.float32), atol=1e-2, rtol=0
  )


def test_interrupted_encode_resumes_to_the_same_cache(tmp_path, tiny_encoder):
  config = tiny_config()
  _encode(config, tmp_path / "straight", tiny_encoder)
  out = _encode(config, tmp_path / "resumed", tiny_encoder, stop_after_shards=1)
  assert out == {"interrupted": True}
  d = feature_cache.cache_dir(tmp_path / "resumed", "train")
  assert not array_cache.is_complete(d)
  with pytest.raises(Exception, match="incomplete"):
    array_cache.CacheSource(d)
  second = _encode(config, tmp_path / "resumed", tiny_encoder)
  assert second["encoded"] == 40 - 16  # only the shards the first run did not finish
  straight_dir = feature_cache.cache_dir(tmp_path / "straight", "train")
  for name in sorted(p.name for p in epath.Path(straight_dir).glob("shard-*")):
    assert (straight_dir / name).read_bytes() == (d / name).read_bytes(), name


def test_cache_of_another_encoder_is_refused(tmp_path, tiny_encoder):
  config = tiny_config(num_examples=8, per_shard=8)
  _encode(config, tmp_path, tiny_encoder)
  other = dict(tiny_encoder[2], fingerprint="another")
  with pytest.raises(ValueError, match="encoder_fingerprint") as e:
    array_cache.CacheSource(
      feature_cache.cache_dir(tmp_path, "train"),
      expected_metadata=feature_cache.cache_metadata(config, other, "train"),
    )
  message = str(e.value)  # the field with both values, and the fix
  assert f"encoder_fingerprint={tiny_encoder[2]['fingerprint']!r}" in message
  assert "encoder_fingerprint='another' is expected now" in message
  assert "delete" in message and "rerun the" in message


def test_run_stages_convert_encode_report_and_skip(tmp_path, monkeypatch):
  config = demo.get_config("random_encoder,tiny")
  config.stages = ("convert", "encode")
  config.data.name = "synthetic"
  config.data.num_examples = 48
  config.data.synthetic_image_size = 28
  config.data.max_train_examples = 32
  config.data.max_eval_examples = 16
  config.encode.examples_per_shard = 16
  config.encode.batch_size = 16
  small = Dinov2Config(width=32, depth=1, num_heads=2, pos_grid=8)
  monkeypatch.setattr(Dinov2Config, "from_variant", classmethod(lambda cls, *a, **k: small))
  report = main.run_stages(config, epath.Path(tmp_path))
  assert report["encode"]["num_examples"] == 48
  assert report["encode"]["images_per_second"] > 0
  assert set(report["stage_seconds"]) == {"convert", "encode"}
  assert report["convert"]["random_weights"] is True
  meta = json.loads((tmp_path / "encoder" / "encoder.json").read_text())
  assert meta["source"]["random"] is True
  # A rerun skips both stages and keeps the report.
  again = main.run_stages(config, epath.Path(tmp_path))
  assert again == report


def test_unknown_stage_and_locked_config_fail_clearly(tmp_path):
  config = tiny_config()
  config.stages = ("convert", "nonsense")
  with pytest.raises(Exception, match="nonsense"):
    main.run_stages(config, epath.Path(tmp_path))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "fae_jax.main",
      "--config=configs/demo.py",
      f"--workdir={tmp_path}",
      "--config.encoder.no_such_field=1",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode != 0
  assert "no_such_field" in proc.stderr


def test_empty_encoder_source_names_the_fix(tmp_path):
  config = tiny_config()
  config.encoder.source = ""
  with pytest.raises(ValueError, match="config.encoder.source"):
    main.run_stages(config, epath.Path(tmp_path))
