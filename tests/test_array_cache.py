"""Tests for the ArrayRecord feature/latent cache: round trip, resume, multi-host, grain."""

import json
import os
import pickle

import grain
import ml_dtypes
import numpy as np
import pytest
from array_record.python import array_record_module

from fae_jax.data import array_cache, cache_integrity

SPEC = {"features": ((3, 4), "bfloat16"), "label": ((), "int32"), "id": ((), "int64")}
TOTAL, PER_SHARD = 23, 5  # 5 shards, the last one short (3 examples).
META = {"encoder_sha256": "aaa", "split": "train", "image_size": [112, 112]}


def _examples(total=TOTAL):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(total, 3, 4)).astype(ml_dtypes.bfloat16)
  # Values that only survive a bit-exact path: NaN payloads, -0, inf, bf16 subnormals.
  flat = feats.reshape(-1)
  flat[:4] = np.array([-0.0, np.inf, -np.inf, 1e-40], np.float32).astype(ml_dtypes.bfloat16)
  flat[4:6] = np.array([0x7FC1, 0xFFA3], np.uint16).view(ml_dtypes.bfloat16)
  return {
    "features": feats,
    "label": rng.integers(-(2**31), 2**31 - 1, size=total, dtype=np.int32),
    "id": rng.integers(-(2**62), 2**62, size=total, dtype=np.int64),
  }


def _write_all(directory, data, *, process_index=0, process_count=1, metadata=META):
  writer = array_cache.CacheWriter(
    directory,
    SPEC,
    TOTAL,
    PER_SHARD,
    process_index=process_index,
    process_count=process_count,
    metadata=metadata,
  )
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    writer.write_shard(shard, {k: v[start:end] for k, v in data.items()})
  return writer


def _records(directory):
  """All records of all shards, as raw bytes, in order."""
  manifest = array_cache.read_manifest(directory)
  out = []
  for s in manifest["shards"]:
    reader = array_record_module.ArrayRecordReader(os.path.join(directory, s["file"]))
    out.extend(reader.read_all())
    reader.close()
  return out


def _shard_bytes(directory):
  names = sorted(n for n in os.listdir(directory) if n.endswith(".array_record"))
  return {n: open(os.path.join(directory, n), "rb").read() for n in names}


def _assert_bit_equal(a, b):
  assert a.dtype == b.dtype and a.shape == b.shape
  assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_round_trip_bit_exact(tmp_path):
  data = _examples()
  _write_all(tmp_path, data).finalize()
  assert array_cache.is_complete(tmp_path)

  manifest = array_cache.read_manifest(tmp_path)
  assert manifest["total"] == TOTAL and manifest["num_shards"] == 5
  assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
  assert manifest["shards"][1]["file"] == "shard-00001-of-00005.array_record"
  assert manifest["metadata"] == META
  assert manifest["record_bytes"] == 3 * 4 * 2 + 4 + 8
  assert sorted(os.listdir(tmp_path)) == sorted(
    ["manifest.json"] + [f"shard-{i:05d}-of-00005.array_record" for i in range(5)]
  )

  source = array_cache.CacheSource(tmp_path, expected_metadata={"encoder_sha256": "aaa"})
  assert len(source) == TOTAL
  assert source.spec["features"] == ((3, 4), np.dtype(ml_dtypes.bfloat16))
  for i in range(TOTAL):
    ex = source[i]
    assert set(ex) == set(SPEC)
    for k in SPEC:
      _assert_bit_equal(ex[k], data[k][i])
  # Batched reads across shard boundaries, out of order.
  keys = [22, 0, 7, 4, 5]
  for ex, i in zip(source.__getitems__(keys), keys):
    _assert_bit_equal(ex["features"], data["features"][i])
    assert ex["id"] == data["id"][i]
  # Decoded arrays are writable (the record is copied once).
  source[3]["features"][0, 0] = 1
  with pytest.raises(IndexError):
    source[TOTAL]


def test_record_format_is_raw_concatenation(tmp_path):
  data = _examples()
  _write_all(tmp_path, data).finalize()
  records = _records(tmp_path)
  fields = array_cache.normalize_spec(SPEC)
  for i, record in enumerate(records):
    expected = data["features"][i].tobytes() + data["label"][i].tobytes() + data["id"][i].tobytes()
    assert record == expected
    assert record == array_cache.encode_example(fields, {k: v[i] for k, v in data.items()})


def test_resume_after_crash_matches_uninterrupted(tmp_path):
  data = _examples()
  reference = tmp_path / "reference"
  _write_all(reference, data).finalize()

  directory = tmp_path / "resumed"
  writer = array_cache.CacheWriter(directory, SPEC, TOTAL, PER_SHARD, metadata=META)
  assert writer.pending_shards() == [0, 1, 2, 3, 4]
  for shard in (0, 3):
    start, end = writer.shard_range(shard)
    writer.write_shard(shard, {k: v[start:end] for k, v in data.items()})

  # Crash in the middle of shard 1: the exception deletes the temp, the shard stays pending.
  with pytest.raises(RuntimeError, match="preempted"):
    with writer.open_shard(1) as out:
      out.write({k: v[5:7] for k, v in data.items()})
      raise RuntimeError("preempted")
  assert not (directory / array_cache.shard_name(1, 5)).exists()
  # A hard kill leaves temp files behind: simulate one (partial bytes) for shard 2.
  stale = directory / (array_cache.shard_name(2, 5) + ".tmp-99999")
  stale.write_bytes(b"partial garbage")
  stale_manifest = directory / "manifest.json.tmp-99999"
  stale_manifest.write_text("{")
  assert not array_cache.is_complete(directory)
  with pytest.raises(FileNotFoundError, match="incomplete"):
    array_cache.CacheSource(directory)

  resumed = array_cache.CacheWriter(directory, SPEC, TOTAL, PER_SHARD, metadata=META)
  assert not stale.exists() and not stale_manifest.exists()
  assert resumed.pending_shards() == [1, 2, 4]
  for shard in resumed.pending_shards():
    start, end = resumed.shard_range(shard)
    with resumed.open_shard(shard) as out:
      for i in range(start, end, 2):  # Streamed in batches of 2.
        out.write({k: v[i : min(i + 2, end)] for k, v in data.items()})
  assert resumed.pending_shards() == []
  resumed.finalize()

  assert _records(directory) == _records(reference)
  assert _shard_bytes(directory) == _shard_bytes(reference)
  assert json.loads((directory / "manifest.json").read_text()) == json.loads(
    (reference / "manifest.json").read_text()
  )
  assert not [n for n in os.listdir(directory) if ".tmp-" in n or n.startswith("writer-")]
  # Reopening a complete cache has nothing to do.
  again = array_cache.CacheWriter(directory, SPEC, TOTAL, PER_SHARD, metadata=META)
  assert again.pending_shards() == []


def test_incomplete_cache_fails_with_fix(tmp_path):
  writer = _write_all(tmp_path, _examples())  # Every shard, but no finalize.
  assert writer.pending_shards() == []
  assert not array_cache.is_complete(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"cache at .* is incomplete.*rerun the encode stage"):
    array_cache.CacheSource(tmp_path)
  with pytest.raises(FileNotFoundError, match="rerun the latents stage"):
    array_cache.CacheSource(tmp_path, stage="latents")


def test_finalize_refuses_missing_shards(tmp_path):
  data = _examples()
  writer = array_cache.CacheWriter(tmp_path, SPEC, TOTAL, PER_SHARD, metadata=META)
  writer.write_shard(0, {k: v[:5] for k, v in data.items()})
  with pytest.raises(RuntimeError, match=r"shards \[1, 2, 3, 4\] are missing"):
    writer.finalize()
  assert not array_cache.is_complete(tmp_path)


def test_metadata_mismatch_names_both_values(tmp_path):
  _write_all(tmp_path, _examples()).finalize()
  with pytest.raises(ValueError, match=r"encoder_sha256='aaa'.*encoder_sha256='bbb'.*delete"):
    array_cache.CacheSource(tmp_path, expected_metadata={"encoder_sha256": "bbb"})
  with pytest.raises(ValueError, match=r"dataset=<absent>.*dataset='fmnist'"):
    array_cache.CacheSource(tmp_path, expected_metadata={"dataset": "fmnist"})
  # Tuples match the lists read back from JSON.
  array_cache.CacheSource(tmp_path, expected_metadata={"image_size": (112, 112)})
  # A writer with another encoder refuses to touch the complete cache.
  with pytest.raises(ValueError, match=r"encoder_sha256='aaa'.*encoder_sha256='bbb'"):
    array_cache.CacheWriter(
      tmp_path, SPEC, TOTAL, PER_SHARD, metadata={**META, "encoder_sha256": "bbb"}
    )


def test_resume_with_changed_encoder_refused(tmp_path):
  data = _examples()
  writer = array_cache.CacheWriter(tmp_path, SPEC, TOTAL, PER_SHARD, metadata=META)
  writer.write_shard(0, {k: v[:5] for k, v in data.items()})
  with pytest.raises(ValueError, match=r"encoder_sha256='aaa'.*encoder_sha256='bbb'"):
    array_cache.CacheWriter(
      tmp_path, SPEC, TOTAL, PER_SHARD, metadata={**META, "encoder_sha256": "bbb"}
    )
  with pytest.raises(ValueError, match="examples_per_shard"):
    array_cache.CacheWriter(tmp_path, SPEC, TOTAL, 4, metadata=META)


def test_two_processes_match_single_process(tmp_path):
  data = _examples()
  _write_all(tmp_path / "single", data).finalize()

  multi = tmp_path / "multi"
  w0 = array_cache.CacheWriter(multi, SPEC, TOTAL, PER_SHARD, process_count=2, metadata=META)
  w1 = array_cache.CacheWriter(
    multi, SPEC, TOTAL, PER_SHARD, process_index=1, process_count=2, metadata=META
  )
  assert w0.pending_shards() == [0, 2, 4] and w1.pending_shards() == [1, 3]
  with pytest.raises(ValueError, match="belongs to process 1"):
    w0.open_shard(1)
  for w in (w1, w0):  # Process 1 runs ahead; order must not matter.
    for shard in w.pending_shards():
      start, end = w.shard_range(shard)
      w.write_shard(shard, {k: v[start:end] for k, v in data.items()})
  w1.finalize()  # No-op on process != 0.
  assert not array_cache.is_complete(multi)
  w0.finalize()  # After the caller's barrier.

  assert array_cache.is_complete(multi)
  assert _shard_bytes(multi) == _shard_bytes(tmp_path / "single")
  assert _records(multi) == _records(tmp_path / "single")


def test_bad_batches_rejected(tmp_path):
  data = _examples()
  writer = array_cache.CacheWriter(tmp_path, SPEC, TOTAL, PER_SHARD, metadata=META)
  batch = {k: v[:5] for k, v in data.items()}
  with pytest.raises(ValueError, match=r"'features': got float32"):
    writer.write_shard(0, {**batch, "features": batch["features"].astype(np.float32)})
  with pytest.raises(ValueError, match="do not match the cache spec"):
    writer.write_shard(0, {"features": batch["features"]})
  with pytest.raises(ValueError, match="overflows"):
    writer.write_shard(0, {k: v[:6] for k, v in data.items()})
  with pytest.raises(ValueError, match="got 4 examples, expected 5"):
    writer.write_shard(0, {k: v[:4] for k, v in data.items()})
  assert writer.pending_shards() == [0, 1, 2, 3, 4]
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_grain_batches_and_pickling(tmp_path):
  data = _examples()
  _write_all(tmp_path, data).finalize()
  source = array_cache.CacheSource(tmp_path)
  source[0]  # Opens a reader; pickling must still work.
  clone = pickle.loads(pickle.dumps(source))
  _assert_bit_equal(clone[17]["features"], data["features"][17])

  batches = list(grain.MapDataset.source(source).batch(4))
  assert len(batches) == 6  # 23 examples: five full batches and one of 3.
  assert batches[-1]["label"].shape == (3,)
  for b, batch in enumerate(batches):
    sl = slice(4 * b, 4 * b + 4)
    for k in SPEC:
      _assert_bit_equal(batch[k], data[k][sl])


# ----------------------------------------------------------------------------------------------
# Integrity: per-shard checksums, verified once, bad shards named and re-encoded alone.


def _reencode(directory, data):
  writer = array_cache.CacheWriter(directory, SPEC, TOTAL, PER_SHARD, metadata=META)
  pending = writer.pending_shards()
  for shard in pending:
    start, end = writer.shard_range(shard)
    writer.write_shard(shard, {k: v[start:end] for k, v in data.items()})
  writer.finalize()
  return pending


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete"])
def test_corrupt_shard_is_named_and_reencoded_alone(tmp_path, damage):
  data = _examples()
  directory = tmp_path / "cache"
  _write_all(directory, data).finalize()
  manifest = array_cache.read_manifest(directory)
  assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
  assert not list(directory.glob("*.sha256"))  # sidecars folded into the manifest
  reference = _shard_bytes(directory)
  array_cache.CacheSource(directory)  # verifies and records every shard as good

  bad_file = directory / array_cache.shard_name(2, 5)
  blob = bad_file.read_bytes()
  if damage == "truncate":
    bad_file.write_bytes(blob[: len(blob) // 2])
  elif damage == "flip_byte":
    bad_file.write_bytes(blob[:-20] + bytes([blob[-20] ^ 1]) + blob[-19:])
  else:
    bad_file.unlink()
  if bad_file.exists():
    # A damaged copy is a new file (staged again, rewritten): a new modification time.
    os.utime(bad_file, (12345, 12345))
  with pytest.raises(array_cache.CorruptCacheError) as e:
    array_cache.CacheSource(directory, stage="encode")
  message = str(e.value)
  assert array_cache.shard_name(2, 5) in message and "shard 2" in message
  assert "Rerun the encode stage" in message and "keeps the good ones" in message
  assert e.value.bad.keys() == {2}

  good_before = {n: b for n, b in _shard_bytes(directory).items() if "00002" not in n}
  array_cache.discard_shards(directory, sorted(e.value.bad))
  assert not array_cache.is_complete(directory)
  assert _reencode(directory, data) == [2]  # only the bad shard is written again
  assert _shard_bytes(directory) == reference  # bit-identical to the first encoding
  assert {n: b for n, b in _shard_bytes(directory).items() if "00002" not in n} == good_before
  source = array_cache.CacheSource(directory)
  _assert_bit_equal(source[12]["features"], data["features"][12])


def test_each_shard_is_hashed_once(tmp_path, monkeypatch):
  directory = tmp_path / "cache"
  _write_all(directory, _examples()).finalize()
  calls = []
  real = cache_integrity.file_sha256
  monkeypatch.setattr(cache_integrity, "file_sha256", lambda p: calls.append(p) or real(p))
  array_cache.CacheSource(directory)
  assert len(calls) == 5
  array_cache.CacheSource(directory)
  array_cache.CacheSource(directory)
  assert len(calls) == 5  # markers: not hashed again
  # A shard replaced by another file (e.g. staged again) is hashed again.
  path = directory / array_cache.shard_name(0, 5)
  blob = path.read_bytes()
  path.unlink()
  path.write_bytes(blob)
  os.utime(path, (1, 1))
  array_cache.CacheSource(directory)
  assert len(calls) == 6


def test_cache_without_checksums_still_reads(tmp_path):
  """Caches finalised before checksums existed: readable, not verified."""
  directory = tmp_path / "cache"
  data = _examples()
  _write_all(directory, data).finalize()
  manifest = json.loads((directory / "manifest.json").read_text())
  for s in manifest["shards"]:
    del s["sha256"]
  (directory / "manifest.json").write_text(json.dumps(manifest))
  _assert_bit_equal(array_cache.CacheSource(directory)[3]["id"], data["id"][3])
