"""How processes split the data: 'global' streams equal any process count; 'shard' reads whole
shard files per host, disjoint and covering the cache."""

import ml_collections
import numpy as np
import pytest

from fae_jax.data import array_cache, pipeline

SPEC = {"x": ((2,), "float32"), "label": ((), "int32"), "id": ((), "int64")}


def _write_cache(directory, *, with_valid=False):
  """50 examples in 7 shards of 8 (the last one short); `with_valid` adds a `valid` field that
  marks every example with id % 7 == 3 invalid."""
  spec = {**SPEC, "valid": ((), "uint8")} if with_valid else SPEC
  writer = array_cache.CacheWriter(
    directory, spec, total=50, examples_per_shard=8, metadata={"kind": "test"}
  )
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    ids = np.arange(start, end)
    fields = {
      "x": np.stack([ids, -ids], 1).astype(np.float32),
      "label": (ids % 3).astype(np.int32),
      "id": ids,
    }
    if with_valid:
      fields["valid"] = (ids % 7 != 3).astype(np.uint8)
    writer.write_shard(shard, fields)
  writer.finalize()
  return directory


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return _write_cache(tmp_path_factory.mktemp("cache"))


def _ids(ds, n):
  it = iter(ds)
  return [next(it)["id"].tolist() for _ in range(n)]


def _config(mode):
  return ml_collections.ConfigDict({"process_split": mode})


@pytest.mark.parametrize("count", [2, 3])
def test_global_split_equals_one_process(cache, count):
  source = array_cache.CacheSource(cache, stage="test")
  batch = 4
  one = _ids(
    pipeline.make_cache_dataset(
      source, batch_size=batch * count, seed=3, process_index=0, process_count=1
    ),
    7,
  )
  parts = [
    _ids(
      pipeline.make_cache_dataset(
        source, batch_size=batch, seed=3, process_index=p, process_count=count
      ),
      7,
    )
    for p in range(count)
  ]
  for k in range(7):
    assert sum((parts[p][k] for p in range(count)), []) == one[k]
  # each epoch is a permutation of the whole cache
  stream = sum(one, [])[:50]
  assert sorted(stream) == list(range(50))


@pytest.mark.parametrize("batch, count, per_process", [(4, 3, 16), (4, 2, 25), (5, 3, 16)])
def test_global_split_finite_epoch_is_even_and_disjoint(cache, batch, count, per_process):
  """One epoch: every process the same number of examples, none twice, < count left out."""
  source = array_cache.CacheSource(cache, stage="test")
  seen = []
  for p in range(count):
    ds = pipeline.make_cache_dataset(
      source,
      batch_size=batch,
      seed=0,
      num_epochs=1,
      drop_remainder=False,
      process_index=p,
      process_count=count,
    )
    ids = [i for b in ds for i in b["id"].tolist()]
    assert len(ids) == per_process
    seen += ids
  assert len(set(seen)) == len(seen) and set(seen) <= set(range(50))
  assert 50 - len(seen) < count


@pytest.mark.parametrize("count", [2, 3, 7])
def test_shard_split_reads_whole_disjoint_covering_files(cache, count):
  source = array_cache.CacheSource(cache, stage="test")
  owned = [array_cache.owned_shards(source, p, count) for p in range(count)]
  flat = sorted(s for shards in owned for s in shards)
  assert flat == list(range(7))  # disjoint and covering
  seen = []
  for p in range(count):
    sub = source.subset(owned[p])
    assert sub.shard_files() == [source.manifest["shards"][s]["file"] for s in owned[p]]
    ds = pipeline.make_cache_dataset(
      source,
      batch_size=1,
      seed=0,
      num_epochs=1,
      process_index=p,
      process_count=count,
      data_config=_config("shard"),
    )
    ids = [i for b in ds for i in b["id"].tolist()]
    # whole files: exactly the examples of the owned shards
    expected = [i for s in owned[p] for i in range(s * 8, min(s * 8 + 8, 50))]
    assert sorted(ids) == expected
    seen += ids
  assert sorted(seen) == list(range(50))


def test_shard_split_needs_a_shard_per_process(cache):
  source = array_cache.CacheSource(cache, stage="test")
  with pytest.raises(ValueError, match="7 shards for 8 processes.*examples_per_shard"):
    array_cache.owned_shards(source, 0, 8)
  with pytest.raises(ValueError, match="process_split"):
    pipeline.make_cache_dataset(
      source, batch_size=1, seed=0, data_config=_config("stride"), process_count=1, process_index=0
    )


# ----------------------------------------------------------------------------------------------
# The batched reader against grain's per-record chain.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_with_invalid(tmp_path_factory):
  return _write_cache(tmp_path_factory.mktemp("cache_invalid"), with_valid=True)


def _per_record_chain(source, *, batch_size, seed, num_epochs, drop_remainder, index, count, mode):
  """The grain pipeline `make_cache_dataset` built before its batched reader: records through
  shuffle -> repeat -> process rows -> to_iter_dataset -> filter(valid) -> batch."""
  import grain

  if mode == "shard" and count > 1:
    source = source.subset(array_cache.owned_shards(source, index, count))
  stream = index if mode == "shard" else 0
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=pipeline._derive_seed(seed, pipeline._SHUFFLE_STREAM, stream))
  ds = ds.repeat(num_epochs)
  if mode == "global":
    ds = pipeline._ProcessRows(ds, batch_size, index, count)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return it.filter(pipeline._is_valid).batch(batch_size, drop_remainder=drop_remainder)


@pytest.mark.parametrize(
  "mode, count, epochs, drop, threads",
  [
    ("global", 1, None, True, 8),
    ("global", 2, 1, False, 0),
    ("global", 3, 2, True, 2),
    ("shard", 2, 1, False, 8),
    ("shard", 3, None, True, 0),
  ],
)
def test_batched_reader_gives_grains_per_record_batches(
  cache_with_invalid, mode, count, epochs, drop, threads
):
  source = array_cache.CacheSource(cache_with_invalid, stage="test")
  config = ml_collections.ConfigDict(
    {"process_split": mode, "read_threads": threads, "prefetch_buffer_size": 8}
  )
  for p in range(count):
    kwargs = dict(batch_size=4, seed=5, num_epochs=epochs, drop_remainder=drop)
    got = pipeline.make_cache_dataset(
      source, **kwargs, process_index=p, process_count=count, data_config=config
    )
    want = _per_record_chain(source, **kwargs, index=p, count=count, mode=mode)
    got_it, want_it = iter(got), iter(want)
    n = 0
    for g, w in zip(got_it, want_it):
      assert g.keys() == w.keys()
      for k in g:
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
        np.testing.assert_array_equal(g[k], w[k])
      assert g["valid"].all()
      n += 1
      if epochs is None and n == 30:
        break
    if epochs is not None:  # both ended together
      assert next(got_it, None) is None and next(want_it, None) is None
    assert n > 0


@pytest.mark.parametrize("threads", [0, 8])
def test_batched_reader_state_round_trip(cache_with_invalid, threads):
  """A fresh iterator given the state after k batches yields exactly the batches that follow,
  with or without read-ahead (the prefetched batches are not skipped)."""
  source = array_cache.CacheSource(cache_with_invalid, stage="test")
  config = ml_collections.ConfigDict({"read_threads": threads, "prefetch_buffer_size": 12})
  ds = pipeline.make_cache_dataset(source, batch_size=4, seed=1, data_config=config)
  it = iter(ds.map(lambda b: {"id": b["id"]}))
  for _ in range(9):
    next(it)
  state = it.get_state()
  rest = [next(it)["id"].tolist() for _ in range(20)]
  again = iter(ds.map(lambda b: {"id": b["id"]}))
  next(again)  # its own read-ahead is running when the state arrives
  again.set_state(state)
  assert [next(again)["id"].tolist() for _ in range(20)] == rest
  with pytest.raises(ValueError, match="next_position.*--redo"):
    again.set_state({"parent": {}})


def test_batched_reader_raises_reader_errors_in_next(cache_with_invalid, monkeypatch):
  source = array_cache.CacheSource(cache_with_invalid, stage="test")

  def broken(indices):
    raise OSError("disk gone")

  monkeypatch.setattr(source, "read_batch", broken)
  config = ml_collections.ConfigDict({"read_threads": 8, "prefetch_buffer_size": 8})
  it = iter(pipeline.make_cache_dataset(source, batch_size=4, seed=0, data_config=config))
  with pytest.raises(OSError, match="disk gone"):
    next(it)


def test_read_batch_equals_stacked_records(cache_with_invalid):
  source = array_cache.CacheSource(cache_with_invalid, stage="test")
  indices = [7, 0, 49, 3, 3]
  got = source.read_batch(indices)
  for k in (*SPEC, "valid"):
    np.testing.assert_array_equal(got[k], np.stack([source[i][k] for i in indices]))
    assert got[k].dtype == source[0][k].dtype and got[k].flags.writeable
  with pytest.raises(IndexError, match="50"):
    source.read_batch([50])


def test_dropped_reader_stops_its_thread(cache_with_invalid):
  import gc

  source = array_cache.CacheSource(cache_with_invalid, stage="test")
  config = ml_collections.ConfigDict({"read_threads": 8, "prefetch_buffer_size": 8})
  it = iter(pipeline.make_cache_dataset(source, batch_size=4, seed=0, data_config=config))
  next(it)
  thread = it._thread
  assert thread.is_alive()
  del it
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()
