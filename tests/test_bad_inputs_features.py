"""NaN/Inf features (issue 15): refused when the cache is written, naming the example ids, the
count, the fields and the fix, instead of a NaN loss in `fae` later; the complete shards are kept
and the rerun after the fix resumes at the refused shard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from test_encode_stage import _encode, tiny_config, tiny_encoder  # noqa: F401

from fae_jax.data import array_cache, feature_cache, finite_check, sources


def test_encoder_with_inf_weights_is_refused_at_encode(tmp_path, tiny_encoder):  # noqa: F811
  directory, params, meta = tiny_encoder
  broken = jax.tree.map(np.array, params)
  leaf = jax.tree.leaves(broken)[0]
  leaf.reshape(-1)[0] = np.inf  # a damaged weight: every feature becomes NaN/Inf
  config = tiny_config(num_examples=40, per_shard=16)
  with pytest.raises(finite_check.NonFiniteOutputsError) as e:
    _encode(config, tmp_path, (directory, broken, meta))
  message = str(e.value)
  assert "encode train: 16 example(s) of shard 0 got NaN/Inf in ['features']" in message
  assert "example ids 0, 1, 2, 3," in message
  assert "config.encoder.dtype='float32'" in message and "encoder.source" in message
  assert "rerun the same command: it resumes at this shard" in message
  cache = feature_cache.cache_dir(tmp_path, "train")
  assert not list(epath.Path(cache).glob("shard-*"))  # nothing of it was committed
  assert not array_cache.is_complete(cache)


def test_some_bad_examples_are_named_and_good_shards_kept(tmp_path, monkeypatch):
  config = tiny_config(num_examples=40, per_shard=16)
  bad = {21, 25}  # shard 1 of [0, 16), [16, 32), [32, 40)
  real_getitem = sources.SyntheticSource.__getitem__

  def getitem(self, index):
    record = real_getitem(self, index)
    if index in bad:
      record["image"] = np.full_like(record["image"], 255)
    return record

  def compute(params, images):  # NaN for an all-white image (the stand-in for an overflow)
    white = jnp.all(images == 255, axis=(1, 2, 3))
    mean = images.astype(jnp.float32).mean(axis=(1, 2)) * params
    return {"features": jnp.where(white[:, None], jnp.nan, mean).astype(jnp.bfloat16)}

  def write():
    return feature_cache.write_image_cache(
      config,
      epath.Path(tmp_path),
      "train",
      spec={"features": ((3,), "bfloat16")},
      metadata={"test": 1},
      compute_fn=compute,
      params=jnp.float32(1.0),
      what="encode",
    )

  monkeypatch.setattr(sources.SyntheticSource, "__getitem__", getitem)
  with pytest.raises(finite_check.NonFiniteOutputsError) as e:
    write()
  message = str(e.value)
  assert "2 example(s) of shard 1" in message and "(example ids 21, 25);" in message
  first = tmp_path / array_cache.shard_name(0, 3)
  kept = first.read_bytes()
  assert not (tmp_path / array_cache.shard_name(1, 3)).exists()

  monkeypatch.setattr(sources.SyntheticSource, "__getitem__", real_getitem)  # the images fixed
  assert write()["encoded"] == 40 - 16  # resumed at shard 1
  assert first.read_bytes() == kept
  source = array_cache.CacheSource(tmp_path)
  features = np.stack([source[i]["features"] for i in range(len(source))]).astype(np.float32)
  assert np.isfinite(features).all()


def test_finite_outputs_and_integer_fields_pass():
  ids, fields = finite_check.bad_ids(
    {"f": np.ones((3, 2), np.float32), "label": np.array([1, 2, 3])}, np.array([7, 8, 9])
  )
  assert len(ids) == 0 and fields == set()
  finite_check.refuse("encode", "train", 0, [ids], fields, None)  # nothing to refuse
