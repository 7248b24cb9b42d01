"""How processes split the data: 'global' streams equal any process count; 'shard' reads whole
shard files per host, disjoint and covering the cache."""

import ml_collections
import numpy as np
import pytest

from fae_jax.data import array_cache, pipeline

SPEC = {"x": ((2,), "float32"), "label": ((), "int32"), "id": ((), "int64")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  directory = tmp_path_factory.mktemp("cache")
  total, per_shard = 50, 8  # 7 shards, the last one short
  writer = array_cache.CacheWriter(
    directory, SPEC, total=total, examples_per_shard=per_shard, metadata={"kind": "test"}
  )
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    ids = np.arange(start, end)
    writer.write_shard(
      shard,
      {
        "x": np.stack([ids, -ids], 1).astype(np.float32),
        "label": (ids % 3).astype(np.int32),
        "id": ids,
      },
    )
  writer.finalize()
  return directory


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
