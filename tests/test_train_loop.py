"""Tests of the shared train loop (fae_jax.train) on a toy MLP over 8 fake CPU devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import train_loop_toy as toy
from clu import metric_writers
from jax.sharding import PartitionSpec as P

from fae_jax import sharding
from fae_jax.train import checkpoint as ckpt_lib
from fae_jax.train import loop, mfu, optim
from fae_jax.train import metrics as train_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
N = 8  # steps of the resume / preemption runs


class RecordingWriter(metric_writers.MetricWriter):
  """Keeps every scalar written (stands in for clu's default TensorBoard writer)."""

  def __init__(self):
    self.scalars: dict[int, dict[str, float]] = {}
    self.histograms: dict[int, dict[str, np.ndarray]] = {}

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(int(step), {}).update(scalars)

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    self.histograms.setdefault(int(step), {}).update(arrays)

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def _flat(tree) -> dict[str, np.ndarray]:
  return {
    jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  }


def _run_script(workdir, num_steps, sigterm_at, out, cache_dir) -> subprocess.CompletedProcess:
  """Runs the toy stage in a fresh Python (same XLA_FLAGS: 8 fake devices)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  # The second process reuses the first one's executables: only saves test time.
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run(
    [sys.executable, str(REPO / "tests" / "train_loop_toy.py"), str(workdir), str(num_steps),
     str(sigterm_at), str(out)],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip


def _data_state(workdir, step) -> dict:
  path = pathlib.Path(workdir) / toy.STAGE / "checkpoints" / str(step) / "data"
  return json.loads((path / "process_0-of-1.json").read_text())


# ------------------------------------------------------------------------------------------------
# Sharded step


def _one_step(mesh, steps=2):
  config = toy.make_config()
  tx, schedule = optim.make_optimizer(config)
  state, shardings = loop.create_train_state(
    config=config, mesh=mesh, init_params_fn=toy.init_params, tx=tx, seed=0
  )
  step = loop.make_train_step(
    loss_fn=toy.loss_fn, tx=tx, schedule=schedule, config=config, shardings=shardings, mesh=mesh
  )
  batch = next(toy.make_data_iter_fn()())
  losses = []
  for _ in range(steps):
    state, metrics = step(state, sharding.global_batch(batch, mesh), ())
    losses.append(float(metrics["train/loss"]))
  return state, losses, step


@pytest.fixture(scope="module")
def fsdp_run():
  return _one_step(toy.make_mesh(), steps=3)


def test_fsdp_step_matches_single_device(fsdp_run):
  state8, losses8, _ = fsdp_run
  kernel = state8.params["params"]["Dense_0"]["kernel"]
  assert not kernel.sharding.is_fully_replicated
  assert kernel.sharding.spec == P(None, "fsdp")
  assert state8.params["params"]["Dense_0"]["bias"].sharding.is_fully_replicated

  state1, losses1, _ = _one_step(sharding.make_mesh(1, 1, devices=jax.devices()[:1]), steps=3)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  assert losses8[-1] < losses8[0]
  for tree8, tree1 in ((state8.params, state1.params), (state8.ema_params, state1.ema_params)):
    flat8, flat1 = _flat(tree8), _flat(tree1)
    for name in flat1:
      np.testing.assert_allclose(flat8[name], flat1[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert int(state8.step) == 3


def test_step_compiles_once(fsdp_run):
  _, _, step = fsdp_run
  assert step._cache_size() == 1


def test_extra_args_are_sharded_jit_arguments():
  mesh = toy.make_mesh()
  config = toy.make_config()
  tx, schedule = optim.make_optimizer(config)
  state, shardings = loop.create_train_state(
    config=config, mesh=mesh, init_params_fn=toy.init_params, tx=tx
  )

  def loss_fn(params, batch, rng, frozen):
    del rng
    pred = toy.MLP().apply(params, batch["x"] @ frozen["proj"])
    return jnp.mean((pred - batch["y"]) ** 2), {}

  extra_shardings = sharding.param_shardings(
    ({"proj": jnp.eye(toy.IN_DIM)},), mesh, config.fsdp_rules, config.fsdp_min_size
  )
  step = loop.make_train_step(
    loss_fn=loss_fn, tx=tx, schedule=schedule, config=config, shardings=shardings, mesh=mesh,
    extra_shardings=extra_shardings,
  )  # fmt: skip
  batch = sharding.global_batch(next(toy.make_data_iter_fn()()), mesh)
  extra1 = jax.device_put(({"proj": jnp.eye(toy.IN_DIM)},), extra_shardings)
  extra2 = jax.device_put(({"proj": 2 * jnp.eye(toy.IN_DIM)},), extra_shardings)
  assert not extra1[0]["proj"].sharding.is_fully_replicated
  state, _ = step(state, batch, extra1)
  want = float(loss_fn(jax.device_get(state.params), jax.device_get(batch), None, extra2[0])[0])
  state, metrics = step(state, batch, extra2)
  np.testing.assert_allclose(float(metrics["train/loss"]), want, rtol=1e-5)
  assert step._cache_size() == 1  # new frozen values, same executable: not closure constants


def test_opt_state_shardings_follow_params(fsdp_run):
  state, _, _ = fsdp_run
  params_sh = jax.tree.map(lambda x: x.sharding, state.params)
  for moment in ("mu", "nu"):
    (tree,) = optax.tree_utils.tree_get_all_with_path(state.opt_state, moment)
    assert jax.tree.map(lambda x: x.sharding, tree[1]) == params_sh, moment
  ema_sh = jax.tree.map(lambda x: x.sharding, state.ema_params)
  assert ema_sh == params_sh


# ------------------------------------------------------------------------------------------------
# Full loop: straight run, SIGTERM in a subprocess, resume in a fresh process


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  writer = RecordingWriter()
  original = metric_writers.create_default_writer
  metric_writers.create_default_writer = lambda *a, **k: writer
  toy.TRACES["loss"] = 0
  try:
    state = loop.train(
      workdir=workdir,
      stage=toy.STAGE,
      config=toy.make_config(N),
      mesh=toy.make_mesh(),
      init_params_fn=toy.init_params,
      loss_fn=toy.loss_fn,
      data_iter_fn=toy.make_data_iter_fn(),
      flops_per_example=2.0 * (toy.IN_DIM * toy.HIDDEN + toy.HIDDEN * toy.OUT_DIM),
    )
  finally:
    metric_writers.create_default_writer = original
  return types.SimpleNamespace(
    workdir=workdir, state=state, writer=writer, traces=toy.TRACES["loss"]
  )


def test_loop_traces_once_and_logs_metrics(straight_run):
  assert straight_run.traces == 1
  assert int(straight_run.state.step) == N
  scalars = straight_run.writer.scalars
  assert {2, 4, 6, 8} <= set(scalars)
  for name in ("train/loss", "train/grad_norm", "train/lr", "train/mse_max", "train/per_example"):
    assert np.isfinite(scalars[8][name]), name
  # lr averaged over steps 6, 7 of warmup 2 + cosine to step 8.
  schedule = optim.make_schedule(toy.make_config(N))
  np.testing.assert_allclose(
    scalars[8]["train/lr"], (float(schedule(6)) + float(schedule(7))) / 2, rtol=1e-5
  )
  for step in (4, 6, 8):  # the first interval has only the compiling step
    assert scalars[step]["perf/steps_per_sec"] > 0
    np.testing.assert_allclose(
      scalars[step]["perf/examples_per_sec"], scalars[step]["perf/steps_per_sec"] * toy.BATCH
    )
    assert 0 < scalars[step]["perf/mfu"] < 1
  assert straight_run.writer.histograms[8]["train/per_example"].shape == (toy.BATCH,)


def test_loop_writes_its_time_split(straight_run):
  """At the last step the loop writes where its wall time went (`time/<kind>_s`): every kind
  present, none negative, the kinds adding up to the total."""
  final = straight_run.writer.scalars[N]
  kinds = (*train_metrics.TimeSplit.KINDS, "other")
  split = {k: final[f"time/{k}_s"] for k in kinds}
  assert all(v >= 0 for v in split.values()), split
  assert split["compile"] > 0 and split["step"] > 0 and split["checkpoint"] > 0, split
  assert sum(split.values()) == pytest.approx(final["time/total_s"], rel=1e-6)
  # Compilation (the first step) is by far the slowest part of this tiny loop.
  assert split["compile"] > split["step"] / (N - 1), split


def test_time_split_format():
  split = train_metrics.TimeSplit()
  split.add("data", 1.0)
  with split.timed("step"):
    pass
  text = split.format()
  assert "data 1.0 s" in text and "compile" not in text and text.endswith(")")
  totals = split.totals()
  assert totals["data"] == 1.0 and totals["total"] >= 0


def test_rerun_of_finished_stage_returns_immediately(straight_run):
  toy.TRACES["loss"] = 0
  state = loop.train(
    workdir=straight_run.workdir,
    stage=toy.STAGE,
    config=toy.make_config(N),
    mesh=toy.make_mesh(),
    init_params_fn=toy.init_params,
    loss_fn=toy.loss_fn,
    data_iter_fn=lambda: pytest.fail("no data needed for a finished stage"),
  )
  assert toy.TRACES["loss"] == 0
  assert int(state.step) == N
  for name, value in _flat(straight_run.state.params).items():
    np.testing.assert_array_equal(_flat(state.params)[name], value)


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resumed")
  cache_dir = tmp_path_factory.mktemp("jax_cache")
  proc = _run_script(workdir, N, N // 2, workdir / "unused.npz", cache_dir)
  return types.SimpleNamespace(workdir=workdir, proc=proc, cache_dir=cache_dir)


def test_sigterm_saves_and_exits_cleanly(preempted_run):
  proc = preempted_run.proc
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (preempted_run.workdir / "unused.npz").exists()  # stopped before the end
  manager = ckpt_lib.Checkpointer(
    preempted_run.workdir / toy.STAGE / "checkpoints", checkpoint_every=100
  )
  try:
    assert list(manager.all_steps()) == [N // 2]
    config = toy.make_config(N)
    tx, _ = optim.make_optimizer(config)
    abstract, shardings = loop.abstract_train_state(
      config=config, mesh=toy.make_mesh(), init_params_fn=toy.init_params, tx=tx
    )
    target = ckpt_lib.abstract_with_shardings(abstract, shardings)
    data_iter = toy.make_data_iter_fn()()
    state, data_iter = manager.restore(N // 2, target, data_iter)
    assert int(state.step) == N // 2
    kernel = state.params["params"]["Dense_0"]["kernel"]
    assert kernel.sharding == shardings.params["params"]["Dense_0"]["kernel"]
    assert data_iter.get_state() == _data_state(preempted_run.workdir, N // 2)
    assert _data_state(preempted_run.workdir, N // 2)["next_index"] == N // 2
  finally:
    manager.close()


def test_resume_in_fresh_process_matches_straight_run(preempted_run, straight_run):
  assert preempted_run.proc.returncode == 0, preempted_run.proc.stderr[-3000:]
  out = preempted_run.workdir / "final.npz"
  proc = _run_script(preempted_run.workdir, N, -1, out, preempted_run.cache_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = np.load(out)
  assert int(resumed["traces"]) == 1
  for prefix, tree in (
    ("params/", straight_run.state.params),
    ("ema/", straight_run.state.ema_params),
  ):
    for name, value in _flat(tree).items():
      np.testing.assert_allclose(resumed[prefix + name], value, rtol=0, atol=1e-6, err_msg=name)
  assert _data_state(preempted_run.workdir, N) == _data_state(straight_run.workdir, N)
  assert _data_state(straight_run.workdir, N)["next_index"] == N


def test_restore_shape_mismatch_names_parameter(straight_run):
  config = toy.make_config(N)
  tx, _ = optim.make_optimizer(config)
  abstract, shardings = loop.abstract_train_state(
    config=config, mesh=toy.make_mesh(), init_params_fn=toy.init_params, tx=tx
  )
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  kernel = target.params["params"]["Dense_1"]["kernel"]
  target.params["params"]["Dense_1"]["kernel"] = jax.ShapeDtypeStruct(
    (toy.HIDDEN, toy.OUT_DIM + 1), kernel.dtype, sharding=kernel.sharding
  )
  manager = ckpt_lib.Checkpointer(
    straight_run.workdir / toy.STAGE / "checkpoints", checkpoint_every=100
  )
  try:
    with pytest.raises(ValueError, match=r"params\.params\.Dense_1\.kernel.*\(32, 4\).*\(32, 5\)"):
      manager.restore(N, target)
  finally:
    manager.close()


# ------------------------------------------------------------------------------------------------
# NaN guard


def test_nan_loss_stops_with_step(tmp_path):
  config = toy.make_config(6)
  config.checkpoint_every = 2
  nan_step = 3

  def loss_fn(params, batch, rng, frozen):  # also exercises extra_args through train()
    return toy.loss_fn(params, {"x": batch["x"] @ frozen["proj"], "y": batch["y"]}, rng)

  with pytest.raises(FloatingPointError, match=rf"train/loss is nan at step {nan_step};.*step 2"):
    loop.train(
      workdir=tmp_path,
      stage=toy.STAGE,
      config=config,
      mesh=toy.make_mesh(),
      init_params_fn=toy.init_params,
      loss_fn=loss_fn,
      data_iter_fn=toy.make_data_iter_fn(shuffle=False, nan_index=nan_step * toy.BATCH + 5),
      extra_args=({"proj": np.eye(toy.IN_DIM, dtype=np.float32)},),
    )
  manager = ckpt_lib.Checkpointer(tmp_path / toy.STAGE / "checkpoints", checkpoint_every=2)
  try:
    assert list(manager.all_steps()) == [2]  # the NaN state (step 4) was never saved
  finally:
    manager.close()


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
  # `make demo` passes a relative workdir; Orbax only accepts absolute checkpoint paths.
  monkeypatch.chdir(tmp_path)
  assert ckpt_lib.absolute_path("runs/x") == tmp_path / "runs" / "x"
  assert str(ckpt_lib.absolute_path("gs://bucket/run")) == "gs://bucket/run"
  config = toy.make_config(4)
  config.checkpoint_every = 2
  kwargs = dict(
    stage=toy.STAGE,
    mesh=toy.make_mesh(),
    init_params_fn=toy.init_params,
    loss_fn=toy.loss_fn,
    data_iter_fn=toy.make_data_iter_fn(),
  )
  state = loop.train(workdir="runs/rel", config=config, **kwargs)
  assert int(state.step) == 4
  manager = ckpt_lib.Checkpointer("runs/rel/toy/checkpoints", checkpoint_every=2)
  try:
    assert list(manager.all_steps()) == [2, 4]
    assert manager.directory.is_absolute()
  finally:
    manager.close()
  config.num_steps = 6  # resume from step 4 through the relative path
  assert int(loop.train(workdir="runs/rel", config=config, **kwargs).step) == 6


# ------------------------------------------------------------------------------------------------
# Optimizer, schedule, MFU


def _opt_config(**overrides) -> ml_collections.ConfigDict:
  c = loop.default_train_config()
  c.update(dict(lr=1.0, warmup_steps=10, num_steps=110, end_lr_factor=0.1, grad_clip=0.0))
  c.update(overrides)
  return c


def test_warmup_cosine_and_constant_schedules():
  cosine = optim.make_schedule(_opt_config())
  expected = {0: 0.0, 5: 0.5, 10: 1.0, 60: 0.55, 85: 0.1 + 0.9 * 0.5 * (1 + np.cos(0.75 * np.pi)),
              110: 0.1, 200: 0.1}  # fmt: skip
  for step, value in expected.items():
    np.testing.assert_allclose(float(cosine(step)), value, rtol=1e-6, atol=1e-7, err_msg=step)
  constant = optim.make_schedule(_opt_config(schedule="constant"))
  for step, value in {0: 0.0, 5: 0.5, 10: 1.0, 1000: 1.0}.items():
    np.testing.assert_allclose(float(constant(step)), value, rtol=1e-6, err_msg=step)
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_opt_config(schedule="linear"))


def test_weight_decay_mask_only_kernels():
  params = {
    "Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
    "LayerNorm_0": {"scale": jnp.ones((3,)), "bias": jnp.ones((3,))},
    "Conv_0": {"kernel": jnp.ones((3, 3, 2, 3))},
    "pos_embed": jnp.ones((1, 4, 3)),
    "cls_token": jnp.ones((1, 1, 3)),
    "mask_token": jnp.ones((1, 1, 3)),
    "block": {"ls1": {"gamma": jnp.ones((3,))}},
  }
  mask = optim.weight_decay_mask(params)
  decayed = {k for k, v in _flat(mask).items() if v}
  assert decayed == {"['Dense_0']['kernel']", "['Conv_0']['kernel']"}
  # Zero gradients: Adam's update is 0, so only the masked decay moves the parameters.
  tx, _ = optim.make_optimizer(_opt_config(schedule="constant", warmup_steps=0, weight_decay=0.1))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for name, update in _flat(updates).items():
    want = -0.1 if name in decayed else 0.0
    np.testing.assert_allclose(update, want, atol=1e-7, err_msg=name)


def test_grad_clip_bounds_update():
  params = {"w": jnp.zeros((10, 10))}
  grads = {"w": jnp.full((10, 10), 10.0)}  # global norm 100
  eps = 1e6  # huge eps: Adam's first update is ~ -lr * g / eps, so it shows g's norm
  norms = {}
  for clip in (0.0, 1.0):
    tx, _ = optim.make_optimizer(
      _opt_config(schedule="constant", warmup_steps=0, eps=eps, grad_clip=clip)
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    norms[clip] = float(optax.tree.norm(updates)) * eps
  np.testing.assert_allclose(norms[0.0], 100.0, rtol=1e-3)
  np.testing.assert_allclose(norms[1.0], 1.0, rtol=1e-3)


def test_device_peak_flops():
  flops, source = mfu.device_peak_flops(jax.devices()[0])
  assert flops > 1e6 and source.startswith("measured") and "float32" in source
  assert mfu.device_peak_flops(jax.devices()[0]) == (flops, source)  # cached
  for kind, platform, want in (
    ("TPU v5 lite", "tpu", 197e12),
    ("TPU v4", "tpu", 275e12),
    ("TPU v6 lite", "tpu", 918e12),
    ("TPU v5", "tpu", 459e12),
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
    ("NVIDIA A100-SXM4-40GB", "gpu", 312e12),
  ):
    fake = types.SimpleNamespace(device_kind=kind, platform=platform)
    got, source = mfu.device_peak_flops(fake)
    assert got == want and "bf16" in source, kind


# Gradient accumulation and the profiler hook


def _deterministic_loss(params, batch, rng):
  """The toy regression without input noise: a mean over examples, so k micro-batches of B/k
  examples average to the loss (and gradient) of the whole batch."""
  del rng
  pred = toy.MLP().apply(params, batch["x"])
  per_example = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
  return per_example.mean(), {"mse_max": per_example.max()}


def _accum_steps(accum: int, batch_size: int, steps: int = 2):
  mesh = toy.make_mesh()
  config = toy.make_config()
  config.batch_size = batch_size
  config.grad_accum_steps = accum
  tx, schedule = optim.make_optimizer(config)
  state, shardings = loop.create_train_state(
    config=config, mesh=mesh, init_params_fn=toy.init_params, tx=tx, seed=0
  )
  step = loop.make_train_step(
    loss_fn=_deterministic_loss,
    tx=tx,
    schedule=schedule,
    config=config,
    shardings=shardings,
    mesh=mesh,
  )
  x, y = toy.make_examples()
  losses, norms = [], []
  for s in range(steps):
    rows = slice(s * batch_size, (s + 1) * batch_size)
    batch = sharding.global_batch({"x": x[rows], "y": y[rows]}, mesh)
    state, metrics = step(state, batch, ())
    losses.append(float(metrics["train/loss"]))
    norms.append(float(metrics["train/grad_norm"]))
  return state, losses, norms


def test_grad_accumulation_equals_one_big_batch_step():
  big_state, big_losses, big_norms = _accum_steps(accum=1, batch_size=32)
  acc_state, acc_losses, acc_norms = _accum_steps(accum=4, batch_size=32)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
  np.testing.assert_allclose(acc_norms, big_norms, rtol=1e-5)
  big, acc = _flat(big_state.params), _flat(acc_state.params)
  for name in big:
    np.testing.assert_allclose(acc[name], big[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # Not vacuous: one micro-batch alone is a different step.
  _, small_losses, small_norms = _accum_steps(accum=1, batch_size=8, steps=1)
  assert abs(small_norms[0] - big_norms[0]) > 1e-3 * big_norms[0]


def test_grad_accumulation_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    _accum_steps(accum=3, batch_size=16, steps=1)


def test_profile_steps_write_a_trace(tmp_path):
  config = toy.make_config(3)
  config.profile_steps = (1, 2)
  loop.train(
    workdir=tmp_path,
    stage=toy.STAGE,
    config=config,
    mesh=toy.make_mesh(),
    init_params_fn=toy.init_params,
    loss_fn=toy.loss_fn,
    data_iter_fn=toy.make_data_iter_fn(),
  )
  traces = list((tmp_path / toy.STAGE / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
