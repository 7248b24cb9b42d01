"""One process of a multi-process check; run by tests/test_multiprocess.py under the launcher.

  python -m fae_jax.multiprocess --num_processes=2 --devices_per_process=4 -- \
      python tests/multihost_worker.py CHECK [OUT_DIR]

CHECK: collective | params_store | share_export | decisions | evaluate_gather

Each check asserts on every process and prints `OK <check> <process>` at the end.
"""

import json
import sys

from fae_jax import multihost

multihost.initialize("auto")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from fae_jax import params_store, sharding  # noqa: E402


def collective() -> None:
  assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  mine = full.reshape(2, 8, 3)[jax.process_index()]  # process i holds rows [8i, 8i + 8)
  x = sharding.global_batch(mine, mesh)
  assert not x.is_fully_addressable
  total = jax.jit(lambda a: a.sum(0), out_shardings=sharding.replicated(mesh))(x)
  np.testing.assert_array_equal(multihost.gather(total), full.sum(0))
  np.testing.assert_array_equal(multihost.gather(x), full)  # every host gets other hosts' rows
  # Only process 0's fn runs; every process gets its value.
  seen = multihost.decide_once("who", lambda: {"decider": jax.process_index(), "x": [1.5, None]})
  assert seen == {"decider": 0, "x": [1.5, None]}, seen
  # A failing decision reaches every process instead of leaving the others waiting.
  try:
    multihost.decide_once("fails", lambda: 1 // 0)
  except ZeroDivisionError:
    assert jax.process_index() == 0
  except RuntimeError as e:
    assert jax.process_index() == 1 and "ZeroDivisionError" in str(e), e
  else:
    raise AssertionError("decide_once must raise on every process")
  multihost.barrier("collective-end")


def save_load(out: epath.Path) -> None:
  mesh = sharding.make_mesh(data=2, fsdp=4)
  values = {
    "w": np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7,
    "b": np.linspace(-1, 1, 8).astype(np.float32),
  }
  specs = {"w": jax.sharding.PartitionSpec("fsdp", None), "b": jax.sharding.PartitionSpec()}
  shardings = {k: jax.sharding.NamedSharding(mesh, s) for k, s in specs.items()}
  params = {
    k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
    for k, v in values.items()
  }
  assert not params["w"].is_fully_addressable
  meta = params_store.save_params(out / "export", params, {"model": "toy"}, "model.json")
  assert meta["num_params"] == 64 * 8 + 8
  assert params_store.exists(out / "export", "model.json")
  restored = params_store.load_params(out / "export", shardings)
  assert restored["w"].sharding == shardings["w"]
  got = multihost.gather(restored)
  for k, v in values.items():
    np.testing.assert_array_equal(got[k], v)
  try:
    params_store.save_params(out / "export", params, {"model": "toy"}, "model.json")
  except FileExistsError:
    pass
  else:
    raise AssertionError("a second save into a complete directory must fail on every process")


def share_export(out: epath.Path) -> None:
  """Collective export of weights only process 0 can produce (the `convert` stage's pattern)."""
  from fae_jax import artifacts

  def load():  # runs on process 0 only: another process would make other numbers
    assert jax.process_index() == 0
    rng = np.random.default_rng(1000 + jax.process_index())
    return {"format": "toy"}, {
      "a": {"w": rng.normal(size=(5, 3)).astype(np.float32)},
      "b": [np.arange(4, dtype=np.int32)],
    }

  value, tree = multihost.share_from_primary("toy", load)
  expected = np.random.default_rng(1000).normal(size=(5, 3)).astype(np.float32)
  assert value == {"format": "toy"}
  np.testing.assert_array_equal(tree["a"]["w"], expected)
  np.testing.assert_array_equal(tree["b"][0], np.arange(4))
  counts = multihost.sum_over_processes(np.asarray([1, 10 * jax.process_index()]))
  np.testing.assert_array_equal(counts, [2, 10])
  # Exports: the first save, then a replacement of another (phase, step), both collective.
  directory = out / "pixel" / "export"
  artifacts.replace_export(directory, {"w": tree["a"]["w"]}, {"phase": "noisy", "step": 2})
  artifacts.replace_export(directory, {"w": 2 * tree["a"]["w"]}, {"phase": "finetune", "step": 4})
  artifacts.replace_export(directory, {"w": 3 * tree["a"]["w"]}, {"phase": "finetune", "step": 4})
  meta = params_store.load_meta(directory, "model.json", "")
  assert (meta["phase"], meta["step"]) == ("finetune", 4), meta
  np.testing.assert_array_equal(params_store.load_params(directory)["w"], 2 * expected)


def decisions(out: epath.Path) -> None:
  """A file that appears between process 0's check and the other host's: one branch for all."""
  from fae_jax.train import metrics as train_metrics

  marker = out / "results.json"
  complete = multihost.decide_once("complete:toy", lambda: marker.exists())
  if multihost.is_primary():
    marker.write_text("{}")  # process 1 would now see it and take the other branch
  multihost.barrier("marker-written")
  assert marker.exists() and complete is False, complete
  # Stats: process 0 computes and writes, the barrier comes before any host reads.
  stats_path = out / "stats.json"
  stats = multihost.decide_once("stats", lambda: {"mean": [float(jax.process_index())], "n": 3})
  if multihost.is_primary():
    multihost.write_text_atomic(stats_path, json.dumps(stats))
  multihost.barrier("stats-written")
  assert json.loads(stats_path.read_text()) == {"mean": [0.0], "n": 3}
  # The train log only process 0 writes: every host gets process 0's loss curve.
  stage_dir = out / "fae"
  if multihost.is_primary():
    stage_dir.mkdir()
    writer = train_metrics.JsonlWriter(stage_dir / train_metrics.LOG_NAME)
    writer.write_scalars(5, {"train/loss": 2.5})
    writer.write_scalars(10, {"train/loss": 1.5})
  curve = train_metrics.logged_loss_curve(stage_dir)
  assert curve == {"train_loss_first": 2.5, "train_loss_last": 1.5}, curve


def evaluate_gather() -> None:
  """`evaluate.generate_images` over a sampler sharded on both hosts' devices."""
  from fae_jax.stages import evaluate

  mesh = sharding.make_mesh(data=2, fsdp=4)
  batch = sharding.batch_sharding(mesh)

  @jax.jit
  def sample(rng, labels):  # latents [B, 2, 2, 3] that depend on the label and the batch index
    noise = jax.random.normal(rng, (labels.shape[0], 2, 2, 3))
    return jax.lax.with_sharding_constraint(noise + labels[:, None, None, None], batch)

  class Decoder:  # the decode step of an Autoencoder: latents -> uint8 images [B, 2, 2, 3]
    def decode(self, z):
      return np.clip(np.asarray(z) * 20 + 128, 0, 255).astype(np.uint8)

  stats = {"mean": np.float32(1.0), "std": np.float32(0.5)}
  labels = np.repeat(np.arange(4, dtype=np.int32), 5)  # 20 samples, batches of 8: a padded tail
  images = evaluate.generate_images(sample, Decoder(), stats, labels, jax.random.key(0), 8)
  assert images.shape == (20, 2, 2, 3)
  expected = []
  for i in range(0, 20, 8):
    y = np.zeros(8, np.int32)
    y[: len(labels[i : i + 8])] = labels[i : i + 8]
    z = jax.random.normal(jax.random.fold_in(jax.random.key(0), i), (8, 2, 2, 3))
    expected.append(Decoder().decode((np.asarray(z) + y[:, None, None, None]) * 0.5 + 1.0))
  np.testing.assert_array_equal(images, np.concatenate(expected)[:20])


if __name__ == "__main__":
  check = sys.argv[1]
  if check == "collective":
    collective()
  elif check == "params_store":
    save_load(epath.Path(sys.argv[2]))
  elif check == "share_export":
    share_export(epath.Path(sys.argv[2]))
  elif check == "decisions":
    decisions(epath.Path(sys.argv[2]))
  elif check == "evaluate_gather":
    evaluate_gather()
  else:
    raise SystemExit(f"unknown check {check!r}")
  print(f"OK {check} {jax.process_index()}", flush=True)
