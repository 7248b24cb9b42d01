"""Bad config values (issue 15): caught before any stage runs, with the key, the reason and the
fix named, and nothing written to the workdir."""

import os
import sys

import pytest
from etils import epath

from configs import common
from fae_jax import config_checks, main
from fae_jax.stages import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import sweep  # noqa: E402


def _config(make_config, stages=("convert", "encode", "fae", "pixel", "diffusion", "evaluate")):
  config = make_config()
  config.stages = stages
  config.fae.train.batch_size = 8
  config.pixel.noisy.train.batch_size = config.pixel.finetune.train.batch_size = 8
  config.diffusion.train.batch_size = config.evaluate.batch_size = 8
  return config


def _refused(config, tmp_path) -> str:
  """Runs the pipeline; asserts it failed up front and left no workdir; returns the message."""
  workdir = tmp_path / "run"
  with pytest.raises(config_checks.ConfigError) as e:
    main.run_stages(config, epath.Path(workdir))
  assert not workdir.exists(), "the check must run before anything is written"
  message = str(e.value)
  assert "nothing was run or written" in message
  return message


def test_a_good_config_passes(tiny_pipeline_config):
  mesh = config_checks.check_config(_config(tiny_pipeline_config), STAGES)
  assert mesh.devices.size == 8


@pytest.mark.parametrize(
  "key,value",
  [
    ("fae.train.num_steps", 0),
    ("fae.train.batch_size", -8),
    ("diffusion.train.num_steps", -1),
    ("pixel.noisy.train.batch_size", 0),
    ("evaluate.batch_size", 0),
    ("evaluate.num_samples", 0),
    ("encode.batch_size", 0),
    ("fae.model.latent_dim", 0),
  ],
)
def test_non_positive_values_name_the_key_and_the_fix(tmp_path, tiny_pipeline_config, key, value):
  config = _config(tiny_pipeline_config)
  head, _, leaf = key.rpartition(".")
  config_checks.get(config, head)[leaf] = value
  message = _refused(config, tmp_path)
  assert f"config.{key}={value}: must be a positive integer" in message
  assert f"set --config.{key}=N with N >= 1" in message


def test_a_disabled_pixel_phase_is_not_an_error_but_a_negative_one_is(
  tmp_path, tiny_pipeline_config
):
  config = _config(tiny_pipeline_config)
  config.pixel.finetune.train.num_steps = 0
  config.pixel.finetune.train.batch_size = 0  # unused by a disabled phase
  config_checks.check_config(config, STAGES)
  config.pixel.finetune.train.num_steps = -2
  message = _refused(config, tmp_path)
  assert "config.pixel.finetune.train.num_steps=-2: must be an integer >= 0" in message


def test_batch_not_divisible_by_the_mesh_is_caught_before_convert_and_encode(
  tmp_path, tiny_pipeline_config
):
  config = _config(tiny_pipeline_config)
  config.fae.train.batch_size = 12  # 8 batch shards; today's stage check fires only at `fae`
  message = _refused(config, tmp_path)
  assert "config.fae.train.batch_size: global batch 12 is not divisible by the 8" in message
  assert "multiple of 8" in message
  config = _config(tiny_pipeline_config)
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.diffusion.train.batch_size = 4
  message = _refused(config, tmp_path)
  assert "config.diffusion.train.batch_size: global batch 4" in message
  assert "{'data': 2, 'fsdp': 4}" in message


def test_mesh_that_does_not_match_the_devices(tmp_path, tiny_pipeline_config):
  config = _config(tiny_pipeline_config)
  config.mesh.data, config.mesh.fsdp = 2, 2
  message = _refused(config, tmp_path)
  assert "config.mesh: mesh: data=2 x fsdp=2 = 4 does not match the 8 devices" in message
  assert "--config.mesh.data/--config.mesh.fsdp" in message
  config.mesh.data, config.mesh.fsdp = 0, 8
  message = _refused(config, tmp_path)
  assert "config.mesh.data=0: a mesh axis is -1" in message and "--config.mesh.data=-1" in message


def test_unknown_stage_and_every_problem_listed_at_once(tmp_path, tiny_pipeline_config):
  config = _config(tiny_pipeline_config, stages=("convert", "encdoe", "fae"))
  config.fae.model.latent_dim = 0
  config.fae.train.batch_size = 6
  message = _refused(config, tmp_path)
  assert "3 problem(s)" in message
  assert "unknown stage(s) ['encdoe']" in message and "'encode'" in message
  assert "config.fae.model.latent_dim=0" in message
  assert "config.fae.train.batch_size: global batch 6" in message


def test_stage_own_checks_run_up_front(tmp_path, tiny_pipeline_config):
  config = _config(tiny_pipeline_config)
  config.diffusion.train.schedule = "cosine"
  config.diffusion.train.num_steps = config.diffusion.train.warmup_steps = 4
  config.evaluate.generators = ("difusion",)
  config.pixel.loss.perceptual = "vgg"
  message = _refused(config, tmp_path)
  assert "config.evaluate.generators: unknown generator(s) ['difusion']" in message
  assert "config.pixel.loss.perceptual must be one of" in message
  assert "config.diffusion.train: train.schedule='cosine' needs num_steps (4) > warmup" in message


def test_existing_workdir_is_left_untouched(tmp_path, tiny_pipeline_config):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("old")
  config = _config(tiny_pipeline_config)
  config.fae.train.num_steps = 0
  with pytest.raises(config_checks.ConfigError):
    main.run_stages(config, epath.Path(workdir))
  assert sorted(os.listdir(workdir)) == ["config.json"]
  assert (workdir / "config.json").read_text() == "old"


def test_unknown_sweep_names_the_choices_and_runs_nothing(tmp_path):
  root = tmp_path / "sweep"
  with pytest.raises(SystemExit) as e:
    sweep.build_commands("configs/demo.py:sweep=latent_dims,tiny", str(root), python="python")
  message = str(e.value)
  assert "Unknown sweep 'latent_dims'" in message and "SWEEPS" in message
  assert "'latent_channels'" in message and "Nothing was run" in message
  assert not root.exists()


def test_every_sweep_field_is_a_config_key():
  base = common.base_config()
  for field, *_rest in common.SWEEPS.values():
    config_checks.get(base, field)  # KeyError names a sweep on a field that does not exist


@pytest.mark.parametrize("name,arg", [("imagenet", "runlocal"), ("demo", "tiny"), ("demo", "")])
def test_shipped_presets_pass(name, arg):
  """The checks hold the shipped presets to the rules (they caught imagenet:runlocal's fae
  warmup of 1000 steps in a 20-step run, which failed only when `fae` started)."""
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config_checks.check_config(module.get_config(arg), STAGES)
