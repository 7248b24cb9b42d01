"""latents -> flow -> evaluate on tiny shapes, after convert/encode/fae/pixel.

The diffusion generator's evaluate path is covered by tests/test_generation_stages.py; both
generators share the code after the sampler, so one end-to-end run (about a minute on 2 cores)
checks the flow alone.
"""

import numpy as np
import pytest
from etils import epath

from configs import imagenet
from fae_jax import artifacts, main
from fae_jax.evaluation import generators as eval_generators
from fae_jax.models import tarflow
from fae_jax.stages import flow


def tiny_flow_config(make_config, generators=("flow",)):
  config = make_config()
  config.stages = ("convert", "encode", "fae", "pixel", "latents", *generators, "evaluate")
  m = config.flow.model
  m.width, m.num_heads, m.deep_depth, m.shallow_depth, m.num_shallow = 32, 2, 1, 1, 1
  t = config.flow.train
  # A large constant rate: the flow starts at the identity, so a few steps visibly lower bits/dim.
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 6, 8, 1, 3
  t.lr, t.schedule, t.warmup_steps, t.ema_decay = 3e-3, "constant", 0, 0.5
  config.flow.sample.guidance_scale = 2.0
  config.evaluate.generators = tuple(generators)
  return config


@pytest.mark.slow
def test_flow_evaluate_end_to_end(tmp_path, small_encoder, tiny_generation_config):
  config = tiny_flow_config(tiny_generation_config)
  report = main.run_stages(config, epath.Path(tmp_path))

  # flow: trained, exported with the derived geometry and the latent statistics.
  params, cfg, meta = artifacts.load_export("flow", artifacts.export_dir(tmp_path, "flow"))
  assert (cfg.input_size, cfg.in_channels, cfg.num_classes) == (2, 4, 4)
  assert meta["step"] == 6 and len(meta["latent_stats"]["std"]) == 4
  f = report["flow"]
  assert f["steps"] == 6 and f["num_params"] > 0
  assert np.isfinite(f["bits_per_dim"]) and np.isfinite(f["bits_per_dim_first"])
  assert f["bits_per_dim"] < f["bits_per_dim_first"]

  # evaluate: the flow's metrics next to the diffusion's, finite, with the PNG grid.
  for key in (
    "fd_dinov2_guided",
    "fd_dinov2_unguided",
    "fd_dinov2_untrained",
    "class_consistency_guided",
    "class_consistency_unguided",
  ):
    assert np.isfinite(f[key]), key
  assert 0 <= f["class_consistency_guided"] <= 1
  assert epath.Path(f["grid_png"]).exists()
  assert f["samplers"]["guided"]["guidance_scale"] == 2.0
  assert f["samplers"]["unguided"]["guidance_scale"] == 1.0
  # Rerun: everything complete, nothing recomputed.
  assert main.run_stages(config, epath.Path(tmp_path)) == report


def test_model_config_derives_geometry_and_rejects_derived_keys():
  config = imagenet.get_config()
  cfg = flow.model_config(config, (16, 16, 32), 1000)
  assert cfg == tarflow.TarFlowConfig(dtype="bfloat16", remat=True)  # STARFlow 1.4B defaults
  assert flow.model_config(config, (8, 8, 16), 10).in_channels == 16
  config.flow.model.in_channels = 16
  with pytest.raises(ValueError, match="derived"):
    flow.model_config(config, (8, 8, 16), 10)
  with pytest.raises(ValueError, match="square"):
    flow.model_config(imagenet.get_config(), (8, 4, 16), 10)


def test_flow_settings():
  s = eval_generators.flow_settings(imagenet.get_config())
  assert s["unguided"]["guidance_scale"] == 1.0 and s["guided"]["guidance_scale"] > 1.0
  assert s["guided"]["temperature"] == s["unguided"]["temperature"]
