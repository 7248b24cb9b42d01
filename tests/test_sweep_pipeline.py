"""A sweep runs whole points (FAE -> latents -> generator -> evaluate) against a shared upstream
run, and the summary ranks the points by the generator's FD beside the FAE metrics (issue 13).

The commands `launch/sweep.py` builds for the tiny demo config are executed in-process: each
command's `--config.*` flags are applied to the tiny generation config (the same stages and
overrides a real sweep passes to `python -m fae_jax.main`)."""

import ast
import os
import sys

import pytest
from etils import epath

from configs import common
from fae_jax import main
from fae_jax.stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import summarize  # noqa: E402
import sweep  # noqa: E402


def _apply(config, command):
  """Sets every `--config.a.b=value` flag of a sweep command on `config`; returns the workdir."""
  workdir = None
  for arg in command:
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      key, value = arg[len("--config.") :].split("=", 1)
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass  # a plain string
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return workdir


def test_pipeline_order_matches_the_stage_registry():
  assert common.PIPELINE == tuple(STAGES)


@pytest.mark.parametrize("name", sorted(common.SWEEPS))
def test_every_sweep_point_reaches_a_generator(name):
  stages = common.sweep_stages(name)
  assert "evaluate" in stages["point"] and "diffusion" in stages["shared"] + stages["point"]
  # every stage a point needs is produced by the shared run or by the point itself
  assert set(common.PIPELINE) == set(stages["shared"]) | set(stages["point"]) | {"flow"}


@pytest.mark.slow
def test_sweep_points_run_every_stage_and_summary_has_generator_fd(
  tmp_path, small_encoder, tiny_generation_config
):
  commands = sweep.build_commands(
    "configs/demo.py:sweep=adapter_depth,random_encoder,tiny", str(tmp_path), points=[0, 1]
  )
  assert len(commands) == 3  # shared + adapter depths 0 and 1
  reports = []
  for command in commands:
    config = tiny_generation_config()
    workdir = _apply(config, command)
    reports.append(main.run_stages(config, epath.Path(workdir)))
  shared, *points = reports
  assert set(shared) >= {"encode", "pixel"} and "fae" not in shared
  for depth, report in zip((0, 1), points, strict=True):
    point_dir = tmp_path / f"adapter_depth={depth}"
    assert report["fae"]["adapter_depth"] == depth
    for stage in ("fae", "latents", "diffusion"):
      assert (point_dir / stage).exists(), stage
    # the encoder, feature cache and pixel decoder are the shared run's, not copied
    for upstream in ("encoder", "features", "pixel"):
      assert not (point_dir / upstream).exists(), upstream
    assert report["diffusion"]["fd_dinov2_guided"] > 0
  columns, rows = summarize.collect(str(tmp_path))
  assert "diffusion.fd_dinov2_guided" in columns and "fae.feature_cosine" in columns
  assert [r["point"] for r in rows] == ["adapter_depth=0", "adapter_depth=1"]
  assert rows[0]["diffusion.fd_dinov2_guided"] != rows[1]["diffusion.fd_dinov2_guided"]
