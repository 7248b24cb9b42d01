"""fae_jax.multihost in one process: start-up decisions, and GCS-safe writes through a fake.

The fake object store (`fake_gcs`) is etils' `mock_epath` backend under `gs://` paths (stored
below `tmp_path`): renames and `shutil.rmtree` are forbidden (not atomic / not working on GCS),
an `rmtree` deletes object by object, and any write or delete can be made to crash, so the tests
stop a write at every point and check that no half-written directory reads as complete.
"""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

from fae_jax import artifacts, fileio, multihost, params_store
from fae_jax.train import metrics as train_metrics


class Crash(Exception):
  pass


class FakeGcs:
  """Counts mutating operations (object writes, deletes); raises `Crash` at `crash_at`."""

  def __init__(self):
    self.ops = 0
    self.crash_at = None
    self.renames = 0

  def tick(self, what):
    if self.crash_at is not None and self.ops >= self.crash_at:
      raise Crash(f"crash before op {self.ops}: {what}")
    self.ops += 1


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the os backend stores gs://b/x as ./gs:/b/x
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else gs:// goes to tf.io.gfile
  fake = FakeGcs()

  def open_(original, path, mode):
    if "a" in mode:
      raise OSError(f"open({path}, {mode!r}): objects on GCS cannot be appended to")
    if any(m in mode for m in "wx+"):
      fake.tick(f"write {path}")
    return original(path, mode)

  def forbid_rename(original, path, dst):
    fake.renames += 1
    raise OSError(f"rename {path} -> {dst}: not atomic on GCS; the code must not rename")

  def remove(original, path):
    fake.tick(f"delete {path}")
    return original(path)

  def rmtree(original, path):  # object by object, as on GCS
    for root, dirs, files in os.walk(path, topdown=False):
      for name in files:
        fake.tick(f"delete {root}/{name}")
        os.remove(os.path.join(root, name))
      for name in dirs:
        os.rmdir(os.path.join(root, name))
    os.rmdir(path)

  real_rmtree = shutil.rmtree

  def shutil_rmtree(path, *args, **kwargs):
    if str(path).startswith("gs:"):
      raise OSError("shutil.rmtree does not work on gs://")
    return real_rmtree(path, *args, **kwargs)

  monkeypatch.setattr(shutil, "rmtree", shutil_rmtree)
  with epath_testing.mock_epath(
    open=open_, rename=forbid_rename, replace=forbid_rename, remove=remove, rmtree=rmtree
  ):
    yield fake


# --- start-up ------------------------------------------------------------------------------------


def test_detect_cluster_uses_jax_cluster_detection(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.delenv("SLURM_LOCALID", raising=False)
  assert multihost.detect_cluster() is None  # this machine: no cluster
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "node[1-2]")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("SLURM_LOCALID", "0")
  assert multihost.detect_cluster() == "SlurmCluster"


@pytest.fixture
def fake_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  updates = []
  monkeypatch.setattr(multihost.jax.config, "update", lambda k, v: updates.append((k, v)))
  for var in (multihost.ENV_COORDINATOR, multihost.ENV_NUM_PROCESSES, multihost.ENV_PROCESS_ID):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(multihost, "detect_cluster", lambda: None)
  return calls, updates


def test_initialize_auto_without_cluster_or_flags_stays_one_process(fake_initialize):
  calls, _ = fake_initialize
  assert multihost.initialize("auto")["distributed"] is False
  assert multihost.initialize("off", "h:1", 2, 0)["distributed"] is False
  assert calls == []


def test_initialize_passes_given_flags_and_env_and_selects_gloo(fake_initialize, monkeypatch):
  calls, updates = fake_initialize
  multihost.initialize("auto", num_processes=2)
  assert calls[-1] == {"num_processes": 2}  # the rest is left to JAX's detection
  monkeypatch.setenv(multihost.ENV_COORDINATOR, "127.0.0.1:1234")
  monkeypatch.setenv(multihost.ENV_PROCESS_ID, "1")
  multihost.initialize("auto", num_processes=2)
  assert calls[-1] == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert ("jax_cpu_collectives_implementation", "gloo") in updates


def test_initialize_auto_on_a_detected_cluster_and_on_without_one(fake_initialize, monkeypatch):
  calls, _ = fake_initialize
  with pytest.raises(ValueError, match="no cluster detected"):
    multihost.initialize("on")
  monkeypatch.setattr(multihost, "detect_cluster", lambda: "GceTpuCluster")
  info = multihost.initialize("auto")
  assert calls == [{}] and info["how"] == "detected GceTpuCluster"


def test_single_process_helpers():
  assert multihost.is_primary()
  multihost.barrier("one")
  assert multihost.decide_once("d", lambda: {"a": [1, 2]}) == {"a": [1, 2]}
  x = jax.device_put(np.arange(16.0).reshape(8, 2))
  np.testing.assert_array_equal(multihost.gather({"x": x})["x"], np.arange(16.0).reshape(8, 2))


# --- GCS-safe writes -----------------------------------------------------------------------------


def test_file_write_on_gcs_is_one_object_write(fake_gcs):
  path = epath.Path("gs://bucket/run/report.json")
  path.parent.mkdir(parents=True)
  multihost.write_text_atomic(path, "old")
  multihost.write_text_atomic(path, "new")
  assert path.read_text() == "new" and fake_gcs.ops == 2 and fake_gcs.renames == 0
  assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_file_write_on_local_disk_replaces_atomically(tmp_path):
  path = tmp_path / "a.json"
  multihost.write_text_atomic(path, "one")
  multihost.write_text_atomic(path, "two")
  assert path.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _write_dir(directory, files, marker_text="meta"):
  with multihost.committed_directory(directory, "meta.json", marker_text) as d:
    for name, text in files.items():
      (d / name).parent.mkdir(parents=True, exist_ok=True)
      (d / name).write_text(text)


def _assert_complete_or_uncommitted(directory, files):
  if multihost.is_committed(directory, "meta.json"):
    for name, text in files.items():
      assert (directory / name).read_text() == text, name


def test_committed_directory_is_never_read_half_written_on_gcs(fake_gcs):
  directory = epath.Path("gs://bucket/run/export")
  old = {"a.txt": "old a", "sub/b.txt": "old b"}
  new = {"a.txt": "new a", "sub/b.txt": "new b", "c.txt": "new c"}
  _write_dir(directory, old)
  total = fake_gcs.ops
  assert total == 3 and multihost.is_committed(directory, "meta.json")
  with pytest.raises(FileExistsError, match="already complete"):
    _write_dir(directory, new)
  # A stale, uncommitted copy (the marker deletion comes first) is cleared and rewritten; crash
  # at every operation of the removal and of the rewrite.
  crashes = 0
  for k in range(40):
    if multihost.is_committed(directory, "meta.json"):
      multihost.remove_directory(directory, "meta.json")
    fake_gcs.ops, fake_gcs.crash_at = 0, k
    try:
      _write_dir(directory, new)
    except Crash:
      crashes += 1
      _assert_complete_or_uncommitted(directory, new)
      assert not multihost.is_committed(directory, "meta.json")
      continue
    finally:
      fake_gcs.crash_at = None
    break
  else:
    raise AssertionError("the write never completed")
  # Each attempt deletes the stale files of the one before, so there are more crash points than
  # the 3 files + marker of one write; every one of them was hit before the write succeeded.
  assert crashes >= 4
  _assert_complete_or_uncommitted(directory, new)
  assert multihost.is_committed(directory, "meta.json") and fake_gcs.renames == 0


def test_crash_while_removing_leaves_the_directory_uncommitted(fake_gcs):
  directory = epath.Path("gs://bucket/run/export")
  _write_dir(directory, {"a.txt": "a", "b.txt": "b"})
  fake_gcs.ops, fake_gcs.crash_at = 0, 2  # marker deleted, one file deleted, then crash
  with pytest.raises(Crash):
    multihost.remove_directory(directory, "meta.json")
  fake_gcs.crash_at = None
  assert directory.exists() and not multihost.is_committed(directory, "meta.json")
  _write_dir(directory, {"a.txt": "a2"})
  assert sorted(p.name for p in directory.iterdir()) == ["a.txt", "meta.json"]


def test_params_store_crash_in_orbax_save_leaves_no_model(tmp_path, monkeypatch):
  params = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
  real_save = ocp.StandardCheckpointer.save

  def crashing_save(self, directory, *args, **kwargs):
    epath.Path(directory).mkdir(parents=True)
    (epath.Path(directory) / "partial").write_text("x")
    raise Crash("killed during the Orbax save")

  monkeypatch.setattr(ocp.StandardCheckpointer, "save", crashing_save)
  with pytest.raises(Crash):
    params_store.save_params(tmp_path / "export", params, {"model": "toy"}, "model.json")
  assert (tmp_path / "export").exists()
  assert not params_store.exists(tmp_path / "export", "model.json")
  with pytest.raises(FileNotFoundError, match="model.json missing"):
    params_store.load_meta(tmp_path / "export", "model.json", "")
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
  meta = params_store.save_params(tmp_path / "export", params, {"model": "toy"}, "model.json")
  assert meta["num_params"] == 16
  assert json.loads((tmp_path / "export" / "model.json").read_text())["model"] == "toy"
  got = params_store.load_params(tmp_path / "export")
  for k, v in params.items():
    np.testing.assert_array_equal(got[k], v)
  assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model.json", "params"]


def test_fileio_uses_the_same_one_object_write_on_gcs(fake_gcs):
  path = epath.Path("gs://bucket/run/features/train/manifest.json")
  fileio.write_json_atomic(path, {"total": 3})  # parent folders created, no rename
  fileio.write_json_atomic(path, {"total": 4})
  assert json.loads(path.read_text()) == {"total": 4}
  assert fake_gcs.ops == 2 and fake_gcs.renames == 0
  assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_train_log_on_gcs_is_rewritten_not_appended_and_continues_after_a_restart(fake_gcs):
  path = epath.Path("gs://bucket/run/fae") / train_metrics.LOG_NAME
  path.parent.mkdir(parents=True)
  writer = train_metrics.JsonlWriter(path)
  writer.write_scalars(5, {"train/loss": 3.0})
  writer.write_scalars(10, {"train/loss": 2.0})
  resumed = train_metrics.JsonlWriter(path)  # a restarted run continues the same log
  resumed.write_scalars(15, {"train/loss": 1.0})
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [5, 10, 15]
  assert train_metrics.logged_loss_curve(path.parent) == {
    "train_loss_first": 3.0,
    "train_loss_last": 1.0,
  }
  assert fake_gcs.renames == 0


def test_train_log_on_local_disk_appends(tmp_path):
  writer = train_metrics.JsonlWriter(tmp_path / train_metrics.LOG_NAME)
  writer.write_scalars(1, {"train/loss": 2.0})
  train_metrics.JsonlWriter(tmp_path / train_metrics.LOG_NAME).write_scalars(2, {"train/loss": 1.0})
  assert train_metrics.logged_loss_curve(tmp_path)["train_loss_last"] == 1.0


def test_replace_export_on_gcs_never_renames_and_never_mixes_two_exports(fake_gcs, monkeypatch):
  # Orbax's tensorstore cannot write to the fake bucket: the export's params are a JSON file here,
  # written through the same committed directory (`model.json` last) as `params_store`.
  def save_export(directory, params, meta):
    with multihost.committed_directory(directory, "model.json", json.dumps(meta)) as d:
      for name, value in params.items():
        (d / f"{name}.json").write_text(json.dumps(np.asarray(value).tolist()))

  def load(directory):
    meta = params_store.load_meta(directory, "model.json", "")
    return meta, np.asarray(json.loads((directory / "w.json").read_text()))

  monkeypatch.setattr(artifacts, "save_export", save_export)
  directory = epath.Path("gs://bucket/run/pixel/export")
  old, new = {"w": np.full((2, 3), 1.0)}, {"w": np.full((2, 3), 2.0)}
  artifacts.replace_export(directory, old, {"phase": "noisy", "step": 2})
  artifacts.replace_export(directory, new, {"phase": "noisy", "step": 2})  # same: kept
  np.testing.assert_array_equal(load(directory)[1], old["w"])
  # Crash at every write/delete of the replacement: the export is the old one, the new one or
  # none (never a mix); the rerun writes the new one.
  k = 0
  while True:
    fake_gcs.ops, fake_gcs.crash_at = 0, k
    try:
      artifacts.replace_export(directory, new, {"phase": "finetune", "step": 4})
    except Crash:
      if params_store.exists(directory, "model.json"):
        meta, w = load(directory)
        np.testing.assert_array_equal(w, (old if meta["phase"] == "noisy" else new)["w"])
      k += 1
      continue
    finally:
      fake_gcs.crash_at = None
    break
  assert k >= 3  # marker delete, file delete, new file, new marker: each was a crash point
  meta, w = load(directory)
  assert (meta["phase"], meta["step"]) == ("finetune", 4)
  np.testing.assert_array_equal(w, new["w"])
  assert fake_gcs.renames == 0


def test_share_from_primary_and_sums_in_one_process():
  value, tree = multihost.share_from_primary("x", lambda: ({"k": 1}, {"a": np.arange(3)}))
  assert value == {"k": 1}
  np.testing.assert_array_equal(tree["a"], np.arange(3))
  np.testing.assert_array_equal(multihost.sum_over_processes(np.asarray([2, 3])), [2, 3])
