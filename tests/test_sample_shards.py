"""Sharded evaluation passes: resume after preemption, never duplicate or lose a sample; the
gathered ADM batch equals the concatenation of the shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fae_jax.evaluation import adm_npz, sample_shards
from fae_jax.stages import evaluate

N, SHARD, BATCH, CLASSES = 22, 4, 4, 2  # 6 shards, the last one short (2 samples)


class TinyAutoencoder:
  """Stands in for `Autoencoder`: latents [B, 2, 2, 3] -> uint8 [B, 4, 4, 3]; features [B, 4, 3]."""

  def decode(self, z):
    x = jnp.repeat(jnp.repeat(jnp.asarray(z), 2, axis=1), 2, axis=2)
    return jnp.clip(jnp.rint(x * 40 + 128), 0, 255).astype(jnp.uint8)

  def features(self, images):
    x = jnp.asarray(images, jnp.float32) / 255.0
    return x.reshape(x.shape[0], 4, 4 * 3)[..., :3] + x.reshape(x.shape[0], 4, 12)[..., 3:6] ** 2


def tiny_sample_fn():
  """A tiny class-conditional generator: Gaussian latents shifted by the label."""

  @jax.jit
  def sample(rng, labels):
    z = jax.random.normal(rng, (labels.shape[0], 2, 2, 3))
    return z + labels[:, None, None, None].astype(jnp.float32)

  return sample


STATS = {"mean": np.zeros(3, np.float32), "std": np.ones(3, np.float32)}


def make_shard_fn():
  labels = evaluate.balanced_labels(N, CLASSES)
  ae = TinyAutoencoder()
  return evaluate.sample_shard_fn(tiny_sample_fn, ae, STATS, labels, jax.random.key(3), BATCH)


class Preempted(Exception):
  pass


def interrupted_after(make, calls: int):
  """`make`, but the process dies while making its `calls + 1`-th shard (before writing it)."""
  count = [0]

  def fn(j, start, stop):
    if count[0] == calls:
      raise Preempted(f"shard {j}")
    count[0] += 1
    return make(j, start, stop)

  return fn


def counting(make, made: list):
  def fn(j, start, stop):
    made.append(j)
    return make(j, start, stop)

  return fn


KEYS = [adm_npz.IMAGES_KEY, adm_npz.LABELS_KEY, "dinov2"]


def test_sampling_resumes_after_preemption_without_duplicates_or_losses(tmp_path):
  # The reference: one uninterrupted pass by one process.
  ref_dir = tmp_path / "ref"
  assert sample_shards.fill_shards(ref_dir, N, SHARD, make_shard_fn(), name="ref") == 6
  want = sample_shards.read_shards(ref_dir, N, SHARD, KEYS)
  np.testing.assert_array_equal(want["index"], np.arange(N))
  np.testing.assert_array_equal(want[adm_npz.LABELS_KEY], evaluate.balanced_labels(N, CLASSES))
  assert want[adm_npz.IMAGES_KEY].shape == (N, 4, 4, 3)
  assert len({im.tobytes() for im in want[adm_npz.IMAGES_KEY]}) == N  # all samples differ

  # Two processes: process 0 (shards 0, 2, 4) is preempted while making its second shard;
  # process 1 (shards 1, 3, 5) finishes.
  run_dir = tmp_path / "run"
  with pytest.raises(Preempted):
    sample_shards.fill_shards(
      run_dir,
      N,
      SHARD,
      interrupted_after(make_shard_fn(), 1),
      name="p0",
      process_index=0,
      process_count=2,
    )
  made = []
  sample_shards.fill_shards(
    run_dir, N, SHARD, counting(make_shard_fn(), made), name="p1", process_index=1, process_count=2
  )
  assert made == [1, 3, 5]
  with pytest.raises(FileNotFoundError, match="samples-00002.npz is missing"):
    sample_shards.read_shards(run_dir, N, SHARD, KEYS)

  # The restart runs on 3 processes: each makes only its missing shards (2 and 4), nothing twice.
  made = []
  for p in range(3):
    sample_shards.fill_shards(
      run_dir,
      N,
      SHARD,
      counting(make_shard_fn(), made),
      name=f"restart p{p}",
      process_index=p,
      process_count=3,
    )
  assert sorted(made) == [2, 4]
  got = sample_shards.read_shards(run_dir, N, SHARD, KEYS)
  for key in ["index", *KEYS]:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # A rerun with everything written makes nothing.
  assert sample_shards.fill_shards(run_dir, N, SHARD, make_shard_fn(), name="again") == 0


def test_gathered_adm_npz_equals_the_concatenation(tmp_path):
  directory = tmp_path / "diffusion_guided"
  sample_shards.fill_shards(directory, N, SHARD, make_shard_fn(), name="gather")
  labels = evaluate.balanced_labels(N, CLASSES)
  path = tmp_path / "diffusion_guided.npz"
  evaluate.write_samples_npz(directory, N, SHARD, path, labels)
  parts = [sample_shards.read_shard(sample_shards.shard_path(directory, j)) for j in range(6)]
  with np.load(path) as data:
    assert sorted(data.files) == [adm_npz.IMAGES_KEY, adm_npz.LABELS_KEY]
    np.testing.assert_array_equal(
      data[adm_npz.IMAGES_KEY], np.concatenate([p[adm_npz.IMAGES_KEY] for p in parts])
    )
    np.testing.assert_array_equal(data[adm_npz.LABELS_KEY], labels)
  assert adm_npz.image_shape(path) == (N, 4, 4, 3)
  # The streamed writer gives the same archive contents as `write_samples`.
  plain = tmp_path / "plain.npz"
  adm_npz.write_samples(plain, adm_npz.read_images(path), labels)
  np.testing.assert_array_equal(adm_npz.read_images(plain), adm_npz.read_images(path))
  # Rows picked across shards (the grid) come back in the asked order.
  rows = np.array([21, 0, 5, 4, 13])
  np.testing.assert_array_equal(
    evaluate.shard_rows(directory, SHARD, rows, adm_npz.IMAGES_KEY),
    adm_npz.read_images(path)[rows],
  )
  with pytest.raises(ValueError, match="got 3 images for 4 labels"):
    adm_npz.write_samples_streamed(
      tmp_path / "short.npz", [np.zeros((3, 4, 4, 3), np.uint8)], (4, 4, 3), np.zeros(4)
    )


def test_a_changed_plan_or_stale_shard_is_refused(tmp_path):
  plan = {"num_samples": N, "setting": {"num_steps": 3}}
  sample_shards.check_plan(tmp_path, plan)
  sample_shards.check_plan(tmp_path, dict(plan))  # the same plan passes
  with pytest.raises(ValueError, match=r"another plan \(differs in \['setting'\]"):
    sample_shards.check_plan(tmp_path, {**plan, "setting": {"num_steps": 4}})
  # A shard whose indices do not belong to its range (made with another shard size).
  sample_shards.write_shard(sample_shards.shard_path(tmp_path, 0), {"index": np.arange(2, 6)})
  with pytest.raises(ValueError, match="outside its range"):
    sample_shards.read_shards(tmp_path, 8, 4, [])
