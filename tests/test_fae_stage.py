"""The `fae` stage end to end on tiny shapes, plus the sweep launcher and its summary."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from etils import epath

from fae_jax import artifacts, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import summarize  # noqa: E402
import sweep  # noqa: E402


def tiny_fae_config(make_config, input_mode="cache"):
  config = make_config()
  config.stages = ("convert", "encode", "fae")
  t = config.fae.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 6, 8, 2, 3
  t.warmup_steps = 1
  config.fae.eval.batch_size = 8
  config.fae.eval.probe_steps = 20
  config.fae.input = input_mode
  return config


@pytest.mark.slow
def test_fae_stage_trains_exports_and_reports(tmp_path, small_encoder, tiny_pipeline_config):
  config = tiny_fae_config(tiny_pipeline_config)
  report = main.run_stages(config, epath.Path(tmp_path))
  fae = report["fae"]
  assert -1.0 <= fae["feature_cosine"] <= 1.0
  for key in ("probe_top1_x", "probe_top1_xhat", "probe_top1_z"):
    assert 0.0 <= fae[key] <= 1.0, (key, fae[key])
  assert fae["steps"] == 6 and fae["latent_shape"] == [2, 2, 4]
  assert fae["eval_examples"] == 16 and fae["probe_train_examples"] == 48
  assert "train_loss_first" in fae and "train_loss_last" in fae
  params, cfg, meta = artifacts.load_export("fae", tmp_path / "fae" / "export")
  assert cfg.latent_dim == 4 and meta["weights"] == "ema" and meta["step"] == 6
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(params))
  # Complete: a rerun skips it and leaves the report alone.
  assert main.run_stages(config, epath.Path(tmp_path)) == report


@pytest.mark.slow
def test_fae_stage_on_the_fly_encoder_matches_cache_input_shapes(
  tmp_path, small_encoder, tiny_pipeline_config
):
  config = tiny_fae_config(tiny_pipeline_config, "encoder")
  config.stages = ("convert", "fae")  # no feature cache at all
  config.fae.train.num_steps = 2
  report = main.run_stages(config, epath.Path(tmp_path))
  assert not (tmp_path / "features").exists()
  assert report["fae"]["steps"] == 2 and -1 <= report["fae"]["feature_cosine"] <= 1


def test_fae_stage_without_cache_names_the_fix(tmp_path, small_encoder, tiny_pipeline_config):
  config = tiny_fae_config(tiny_pipeline_config)
  config.stages = ("convert", "fae")
  with pytest.raises(FileNotFoundError, match="encode"):
    main.run_stages(config, epath.Path(tmp_path))


def test_sweep_expands_points_with_shared_upstream(tmp_path):
  cmds = sweep.build_commands(
    "configs/demo.py:sweep=adapter_depth,tiny", str(tmp_path), python="python"
  )
  assert len(cmds) == 5  # shared + depths 0, 1, 2, 6
  shared = cmds[0]
  assert f"--workdir={tmp_path}/shared" in shared
  assert "--config=configs/demo.py:tiny" in shared
  depths = [c for cmd in cmds[1:] for c in cmd if c.startswith("--config.fae.model.adapter_depth=")]
  assert depths == [f"--config.fae.model.adapter_depth={d}" for d in (0, 1, 2, 6)]
  assert all(f"--config.upstream_workdir={tmp_path}/shared" in cmd for cmd in cmds[1:])
  with pytest.raises(SystemExit):
    sweep.build_commands("configs/demo.py:tiny", str(tmp_path))
  short = sweep.build_commands(
    "configs/demo.py:sweep=adapter_depth", str(tmp_path), extra=["--config.fae.train.num_steps=5"]
  )
  assert all(cmd[-1] == "--config.fae.train.num_steps=5" for cmd in short[1:])
  assert "--config.fae.train.num_steps=5" not in short[0]


def test_summarize_collects_points(tmp_path):
  for depth, cos in ((0, 0.8), (1, 0.9)):
    d = tmp_path / f"adapter_depth={depth}"
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"fae": {"feature_cosine": cos, "steps": 5}}))
  (tmp_path / "shared").mkdir()
  columns, rows = summarize.collect(str(tmp_path))
  assert columns == ["point", "fae.feature_cosine", "fae.steps"]
  assert [r["fae.feature_cosine"] for r in rows] == [0.8, 0.9]
  md = summarize.to_markdown(columns, rows)
  assert "| adapter_depth=1 | 0.9 | 5 |" in md
  assert summarize.to_csv(columns, rows).splitlines()[0] == "point,fae.feature_cosine,fae.steps"


@pytest.mark.slow
def test_sweep_point_runs_against_shared_upstream(tmp_path, small_encoder, tiny_pipeline_config):
  shared = tiny_fae_config(tiny_pipeline_config)
  shared.stages = ("convert", "encode")
  main.run_stages(shared, epath.Path(tmp_path / "shared"))
  point = tiny_fae_config(tiny_pipeline_config)
  point.stages = ("fae",)
  point.upstream_workdir = str(tmp_path / "shared")
  point.fae.model.adapter_depth = 0
  point.fae.train.num_steps = 2
  report = main.run_stages(point, epath.Path(tmp_path / "adapter_depth=0"))
  assert report["fae"]["adapter_depth"] == 0
  assert not (tmp_path / "adapter_depth=0" / "features").exists()
