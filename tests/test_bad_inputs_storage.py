"""A full disk or a read-only workdir (issue 15) while a checkpoint, a cache shard, an export or a
JSON file is written: a `StorageError` naming the file, the reason and the fix; what was complete
before stays intact; once the fault is gone the same call completes (resumes).

The faults are injected (we run as root: chmod does not stop our writes) by making the lowest
write the pipeline reaches raise the OSError the kernel would."""

import errno
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_loop_toy as toy
from array_record.python import array_record_module
from etils import epath

from fae_jax import fileio, params_store
from fae_jax.data import array_cache
from fae_jax.storage_errors import StorageError
from fae_jax.train import checkpoint as ckpt_lib
from fae_jax.train import loop

FAULTS = {
  errno.ENOSPC: ("no space left on device (ENOSPC)", "Fix: free space on the disk holding"),
  errno.EROFS: ("read-only file system (EROFS)", "(or use a writable --workdir)"),
}


def _oserror(code, filename=None):
  return OSError(code, os.strerror(code), filename)


def _train(workdir, num_steps):
  config = toy.make_config(num_steps)
  config.checkpoint_every = 2
  return loop.train(
    workdir=workdir,
    stage=toy.STAGE,
    config=config,
    mesh=toy.make_mesh(),
    init_params_fn=toy.init_params,
    loss_fn=toy.loss_fn,
    data_iter_fn=toy.make_data_iter_fn(),
  )


@pytest.mark.parametrize("code", sorted(FAULTS))
def test_checkpoint_save_fault_keeps_the_previous_one_and_resumes(tmp_path, monkeypatch, code):
  real_save = ocp.JsonCheckpointHandler._save_fn

  async def failing_save(self, x, directory):  # the `config` item of the step-4 save
    if epath.Path(directory).parent.name.startswith("4"):
      raise _oserror(code, os.fspath(directory / "metadata"))
    return await real_save(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing_save)
  with pytest.raises(StorageError) as e:
    _train(tmp_path, 6)
  message = str(e.value)
  reason, fix = FAULTS[code]
  assert e.value.errno == code
  assert "checkpoint save: cannot write" in message and "metadata" in message
  assert reason in message and fix in message
  assert "checkpoints already complete" in message and "intact" in message
  assert "rerun the same command: it resumes" in message

  checkpoints = ckpt_lib.Checkpointer(tmp_path / toy.STAGE / "checkpoints", checkpoint_every=2)
  try:
    assert list(checkpoints.all_steps()) == [2]  # the failed save never became a checkpoint
  finally:
    checkpoints.close()

  log = tmp_path / toy.STAGE / "train_log.jsonl"
  logged = len(log.read_text().splitlines())
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real_save)  # space is back
  assert int(_train(tmp_path, 6).step) == 6
  rows = [json.loads(line) for line in log.read_text().splitlines()[logged:]]
  train_steps = [r["step"] for r in rows if "train/loss" in r]
  assert train_steps == [4, 6]  # resumed from step 2 (a fresh start logs step 2 too)


SPEC = {"features": ((3,), "float32"), "id": ((), "int64")}
TOTAL, PER_SHARD = 10, 4  # shards of 4, 4, 2


def _data():
  return {"features": np.arange(30, dtype=np.float32).reshape(10, 3), "id": np.arange(10)}


def _write_pending(directory):
  writer = array_cache.CacheWriter(directory, SPEC, TOTAL, PER_SHARD, metadata={"m": 1})
  data = _data()
  for shard in writer.pending_shards():
    start, end = writer.shard_range(shard)
    with writer.open_shard(shard) as out:
      out.write({k: v[start:end] for k, v in data.items()})
  writer.finalize()


def test_cache_shard_fault_keeps_complete_shards_and_resumes(tmp_path, monkeypatch):
  real_writer = array_record_module.ArrayRecordWriter

  class FullDisk:
    """ArrayRecord's writer on a disk that fills up during the second shard."""

    def __init__(self, path, options):
      self.inner, self.path = real_writer(path, options), path

    def write(self, record):
      if "00001-of-" in self.path:
        raise RuntimeError(f"PWRITE failed: {os.strerror(errno.ENOSPC)} [while writing]")
      self.inner.write(record)

    def close(self):
      self.inner.close()

  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
  with pytest.raises(StorageError) as e:
    _write_pending(tmp_path)
  message = str(e.value)
  second = array_cache.shard_name(1, 3)
  assert f"cache shard 1: cannot write {tmp_path / second}" in message
  assert "no space left on device (ENOSPC)" in message and "Fix: free space" in message
  assert "Complete shards are intact" in message
  first = tmp_path / array_cache.shard_name(0, 3)
  first_bytes = first.read_bytes()
  assert not (tmp_path / second).exists()
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # the partial file is gone

  monkeypatch.setattr(array_record_module, "ArrayRecordWriter", real_writer)
  _write_pending(tmp_path)
  assert first.read_bytes() == first_bytes  # shard 0 was not rewritten
  source = array_cache.CacheSource(tmp_path, verify=True)
  np.testing.assert_array_equal(np.stack([source[i]["id"] for i in range(10)]), np.arange(10))


def test_export_fault_leaves_no_half_export_and_resaves(tmp_path, monkeypatch):
  real_save = ocp.StandardCheckpointer.save

  def read_only(self, directory, *args, **kwargs):
    raise _oserror(errno.EROFS, os.fspath(directory))

  params = {"w": np.ones((2, 3), np.float32)}
  directory = tmp_path / "fae" / "export"
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", read_only)
  with pytest.raises(StorageError) as e:
    params_store.save_params(directory, params, {"model": "fae"}, "model.json")
  message = str(e.value)
  assert "saving model.json's parameters: cannot write" in message
  assert "read-only file system (EROFS)" in message and f"make {directory} writable" in message
  assert not params_store.exists(directory, "model.json")  # nothing half-committed

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
  params_store.save_params(directory, params, {"model": "fae"}, "model.json")
  np.testing.assert_array_equal(params_store.load_params(directory)["w"], params["w"])


def test_json_write_fault_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "report.json"
  fileio.write_json_atomic(path, {"old": 1})
  gpath = type(epath.Path(path))
  real = gpath.write_bytes

  def fills_up(self, data):
    real(self, data[:3])  # part of it lands, then the disk is full
    raise _oserror(errno.ENOSPC, os.fspath(self))

  monkeypatch.setattr(gpath, "write_bytes", fills_up)
  with pytest.raises(StorageError, match=r"writing a file: cannot write .*report\.json.*ENOSPC"):
    fileio.write_json_atomic(path, {"new": 2})
  assert json.loads(path.read_text()) == {"old": 1}
  assert os.listdir(tmp_path) == ["report.json"]  # the partial temp file was removed
  monkeypatch.setattr(gpath, "write_bytes", real)
  fileio.write_json_atomic(path, {"new": 2})
  assert json.loads(path.read_text()) == {"new": 2}
