"""Ahead-of-time compilation for a TPU slice from this CPU machine (fae_jax.aot).

Needs libtpu (the `test` extra pins it); without it every test here skips and says why.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import runpy
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import demo
from fae_jax import aot, aot_compile, tpu_chips

REPO = pathlib.Path(__file__).resolve().parents[1]

needs_libtpu = pytest.mark.skipif(
  not aot_compile.libtpu_available(),
  reason="libtpu is not installed (pip install -e '.[test]' pins libtpu==0.0.42.1): the TPU "
  "compiler is needed to compile for a TPU topology",
)

TOPOLOGY = "v5e:2x2"  # 4 chips


def test_make_test_installs_libtpu(monkeypatch):
  """`make test` builds its venv with the `test` extra, which pins libtpu: the AOT tests below
  run there instead of skipping. Where the test extra is installed, libtpu must be too."""
  import setuptools

  captured = {}
  monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
  monkeypatch.chdir(REPO)
  runpy.run_path(str(REPO / "setup.py"))
  assert "libtpu==0.0.42.1" in captured["extras_require"]["test"]
  makefile = (REPO / "Makefile").read_text()
  assert "pip install --quiet -e '.[test]'" in makefile
  assert re.search(r"^test: assets$", makefile, re.M) and re.search(
    r"^assets: venv$", makefile, re.M
  )
  try:
    importlib.metadata.version("pytest-xdist")  # a package only the test extra brings
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("the test extra is not installed in this environment")
  assert aot_compile.libtpu_available(), (
    "the test extra is installed without libtpu: pip install -e '.[test]'"
  )


def _tiny_config(data: int, fsdp: int):
  config = demo.get_config("random_encoder,tiny")
  config.mesh.data, config.mesh.fsdp = data, fsdp
  for train in (config.fae.train, config.diffusion.train, config.flow.train):
    train.fsdp_min_size = 256  # the tiny models' kernels really shard
  return config


def _shard_bytes(spec: aot_compile.StepSpec) -> int:
  """Bytes one device holds of the train state (from the abstract arguments' shardings)."""
  total = 0
  for leaf in jax.tree.leaves(spec.args[0]):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * leaf.dtype.itemsize
  return total


@pytest.fixture(scope="module")
def compiled():
  """FAE (from the cache) and DiT train steps, on a data x fsdp mesh and a pure-data mesh."""
  chip = tpu_chips.chip_by_name(TOPOLOGY)
  devices = aot_compile.topology_devices(TOPOLOGY)
  out = {}
  for data, fsdp in ((2, 2), (4, 1)):
    config = _tiny_config(data, fsdp)
    from fae_jax import sharding

    mesh = sharding.make_mesh(data, fsdp, devices)
    for name in ("fae", "diffusion"):
      spec = aot.build_step(name, config, mesh)
      out[name, fsdp] = (spec, aot_compile.compile_step(spec, chip, mesh.devices.size), mesh)
  return out


@needs_libtpu
def test_topology_devices_are_the_slice():
  devices = aot_compile.topology_devices(TOPOLOGY)
  assert len(devices) == 4
  assert tpu_chips.chip_for_device_kind(devices[0].device_kind).name == "v5e"


@needs_libtpu
def test_memory_report_of_the_train_steps(compiled):
  hbm = tpu_chips.chip_by_name(TOPOLOGY).hbm_bytes
  for (name, fsdp), (spec, report, _) in compiled.items():
    state = _shard_bytes(spec)
    assert state > 0
    # Arguments: the state's shards plus this device's slice of the batch (small here).
    assert state <= report.argument_bytes <= state + 2**20, (name, fsdp)
    # The state is donated: the new state's buffers alias the old ones.
    assert report.alias_bytes >= 0.9 * state, (name, fsdp)
    assert report.code_bytes > 0 and report.temp_bytes >= 0
    assert report.peak_bytes < hbm and report.fits
    assert report.num_params == sum(
      int(np.prod(a.shape)) for a in jax.tree.leaves(spec.args[0].params)
    )
  # FSDP over 2 devices halves (roughly) what each device holds of the sharded kernels.
  fae_fsdp, fae_dp = compiled["fae", 2][1], compiled["fae", 1][1]
  assert fae_fsdp.argument_bytes < 0.7 * fae_dp.argument_bytes


@needs_libtpu
def test_flops_match_the_analytic_count(compiled):
  for (name, fsdp), (_, report, _) in compiled.items():
    # XLA counts every op (norms, softmax, optimizer), the analytic count only the matmuls.
    ratio = report.xla_flops / report.analytic_flops
    assert 0.8 < ratio < 3.0, (name, fsdp, ratio)
    assert report.roofline_s > 0 and report.images_per_s > 0


@needs_libtpu
def test_collectives_in_the_hlo(compiled):
  dp = compiled["fae", 1][1].collectives
  assert "all-reduce" in dp and dp["all-reduce"][1] > 0  # gradients averaged over data
  assert "all-gather" not in dp  # nothing sharded to gather
  fsdp = compiled["fae", 2][1].collectives
  assert fsdp.get("all-gather", (0, 0))[0] > 0  # FSDP kernels gathered for the matmuls
  # Gradients of sharded kernels are reduced (all-reduce or reduce-scatter) over the batch.
  assert fsdp.get("reduce-scatter", (0, 0))[0] + fsdp.get("all-reduce", (0, 0))[0] > 0


@needs_libtpu
def test_table_and_fix_message(compiled):
  spec, report, mesh = compiled["diffusion", 2]
  table = aot_compile.format_table([report], TOPOLOGY, mesh)
  assert "| diffusion |" in table and "yes" in table and "16 GiB" in table
  assert report.fix(mesh) == ""
  import dataclasses

  too_big = dataclasses.replace(report, temp_bytes=40 * 2**30)
  message = too_big.fix(mesh)
  assert not too_big.fits
  assert "diffusion.train.grad_accum_steps=4" in message and "diffusion.model.remat" in message
  params_too_big = dataclasses.replace(report, argument_bytes=15 * 2**30, temp_bytes=2**30)
  assert "--config.mesh.fsdp=4" in params_too_big.fix(mesh)


def test_hlo_collective_parser():
  hlo = textwrap.dedent(
    """\
    %all-gather-start = (bf16[8,128]{1,0}, bf16[32,128]{1,0}) all-gather-start(%p), dimensions={0}
    %all-gather-done = bf16[32,128]{1,0} all-gather-done(%all-gather-start)
    ROOT %all-reduce.1 = (f32[10]{0}, f32[6]{0}) all-reduce(%a, %b), to_apply=%add
    %rs = f32[4,4]{1,0} reduce-scatter(%c), dimensions={0}
    %fusion = f32[4]{0} fusion(%all-reduce.1), kind=kLoop
    """
  )
  got = aot_compile.hlo_collectives(hlo)
  assert got == {
    "all-gather": (1, 32 * 128 * 2),
    "all-reduce": (1, 16 * 4),
    "reduce-scatter": (1, 64),
  }


@needs_libtpu
def test_mesh_builds_over_tpu_devices_in_a_fresh_process():
  """`make_mesh` on TPU devices in a process where nothing imported jax.experimental.mesh_utils
  before it (`make_mesh` used it without importing it), including shapes that split a physical torus axis of v5p:4x4x4."""
  script = textwrap.dedent(
    """
    import sys
    import jax
    from jax._src import xla_bridge  # the topology without importing jax.experimental
    devices = xla_bridge.make_pjrt_tpu_topology("v5p:4x4x4")._make_compile_only_devices()
    assert "jax.experimental.mesh_utils" not in sys.modules, "precondition"
    from fae_jax import sharding
    for data, fsdp in ((-1, 16), (-1, 8), (64, 1), (2, 32)):
      mesh = sharding.make_mesh(data, fsdp, devices)
      assert mesh.devices.size == 64 and mesh.shape["fsdp"] == (fsdp if fsdp > 0 else 64)
      assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    print("ok", mesh.devices.shape)
    """
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ok (2, 32)" in result.stdout


@needs_libtpu
def test_every_step_lowers_for_the_slice():
  """Each step of `--stages` (pixel with the perceptual loss and the GAN, both phases, the flow,
  the samplers) traces and lowers with the slice's shardings, its inputs abstract."""
  config = _tiny_config(2, 2)
  config.pixel.loss.perceptual = "dino"
  config.pixel.loss.perc_weight = 1.0
  config.pixel.loss.gan_weight = 0.1
  mesh = aot.sharding_lib.make_mesh(2, 2, aot_compile.topology_devices(TOPOLOGY))
  for name in aot.STEPS:
    spec = aot.build_step(name, config, mesh)
    text = spec.fn.lower(*spec.args).as_text()
    assert "sharding" in text, name  # the mesh's shardings reach the program
    assert spec.num_params > 0 and spec.global_batch > 0 and spec.analytic_flops > 0, name
    if name == "pixel":
      # decoder + discriminator trained; the frozen DINOv2 is an argument, not a trained param
      assert set(spec.args[0].params) == {"decoder", "disc"}
      assert "encoder" in spec.args[2][0]


@needs_libtpu
def test_a_step_the_compiler_refuses_is_reported_with_its_fix():
  """XLA's TPU compiler itself refuses a step whose temporaries exceed HBM (RESOURCE_EXHAUSTED,
  no executable): the report says it does not fit, with the temporaries from the compiler's
  message and a fix naming accumulation, instead of a traceback."""
  config = _tiny_config(4, 1)
  config.diffusion.train.batch_size = 2**20  # ~60 GiB of activations per v5e chip (16 GiB)
  reports, mesh = aot.run(config, TOPOLOGY, ["diffusion"], log=lambda _: None)
  (report,) = reports
  assert "RESOURCE_EXHAUSTED" in report.compile_error
  assert not report.fits
  assert report.temp_bytes > tpu_chips.chip_by_name(TOPOLOGY).hbm_bytes
  assert report.argument_bytes > 0 and report.roofline_s > 0
  text, all_fit = aot.summary(reports, TOPOLOGY, mesh)
  assert not all_fit
  assert "| diffusion |" in text and "NO" in text and "n/a (not compiled)" in text
  assert "refused" in text and "--config.diffusion.train.grad_accum_steps=" in text


@needs_libtpu
def test_fsdp_step_gathers_weights_not_activations():
  """Pure FSDP (data=1, fsdp=4): the train step pins its activations to the batch axes
  (`sharding.activation_sharding`), so the collectives move the sharded weights, a few times
  their size per step (forward, remat, backward), and never the activations. Without the pin
  XLA's partitioner gathered the tiny TarFlow's activations instead (all-gather 23x and
  all-to-all 9x the parameter bytes here; on STARFlow-1.4B over v5e-256 it made the step need
  18.6 GiB per chip instead of 2.7)."""
  config = _tiny_config(1, 4)
  config.flow.train.batch_size = 16
  from fae_jax import sharding

  mesh = sharding.make_mesh(1, 4, aot_compile.topology_devices(TOPOLOGY))
  spec = aot.build_step("flow", config, mesh)
  report = aot_compile.compile_step(spec, tpu_chips.chip_by_name(TOPOLOGY), 4)
  param_bytes = sum(a.size * 4 for a in jax.tree.leaves(spec.args[0].params))
  gathered = report.collectives.get("all-gather", (0, 0))[1]
  assert 0 < gathered <= 8 * param_bytes, (gathered, param_bytes)
  assert report.collectives.get("all-to-all", (0, 0))[1] <= 0.1 * param_bytes, report.collectives


def test_fix_names_remat_only_when_it_is_off():
  """The "does not fit" message suggests `model.remat=True` only for a model that has it off."""
  config = _tiny_config(4, 1)
  config.flow.model.remat = True
  config.diffusion.model.remat = False
  assert aot._remat_fix(config, "flow.model.remat") is None
  assert aot._remat_fix(config, "diffusion.model.remat") == "diffusion.model.remat"
  report = aot_compile.StepReport(
    name="flow",
    num_params=1,
    global_batch=64,
    argument_bytes=2**30,
    output_bytes=0,
    alias_bytes=0,
    temp_bytes=40 * 2**30,
    code_bytes=0,
    hbm_bytes=16 * 2**30,
    xla_flops=1.0,
    analytic_flops=1.0,
    bytes_accessed=1.0,
    collectives={},
    roofline_s=1.0,
    images_per_s=1.0,
    compile_s=1.0,
    fix_keys={"train": "flow.train"},
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("data", "fsdp"))
  msg = report.fix(mesh)
  assert "remat" not in msg and "--config.flow.train.grad_accum_steps=" in msg
