"""The README's Python examples run, each in a fresh interpreter, against a tiny run's outputs.

A session fixture runs `convert, encode, fae, pixel` of the tiny pipeline into `<tmp>/runs/demo`
(the path the examples use) and writes a small random DINOv2 checkpoint where the conversion
example reads one; every ```python block of README.md then runs as a script in `<tmp>`. A
documented call that breaks (a moved name, a changed signature) fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from etils import epath

from fae_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
  BLOCKS = re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_the_readme_has_examples():
  assert len(BLOCKS) >= 3
  assert any("Autoencoder.load" in b for b in BLOCKS)


def _write_random_dinov2_checkpoint(path: str) -> None:
  """A random 1-layer Hugging Face DINOv2-S state dict (what `torch.load` of a checkpoint gives);
  the width is a published one, so `infer_config` knows its heads."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = transformers.Dinov2Config(
    hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=1536,
    image_size=56, patch_size=14,
  )  # fmt: skip
  torch.manual_seed(0)
  torch.save(transformers.Dinov2Model(config).state_dict(), path)


@pytest.fixture(scope="session")
def readme_dir(tmp_path_factory, tiny_pipeline_config, patch_small_encoder):
  root = epath.Path(tmp_path_factory.mktemp("readme"))
  config = tiny_pipeline_config()
  config.stages = ("convert", "encode", "fae", "pixel")
  t = config.fae.train
  t.num_steps, t.batch_size, t.warmup_steps = 2, 8, 0
  config.fae.eval.batch_size, config.fae.eval.probe_steps = 8, 5
  config.pixel.model.patch_size = 14  # 2 x 2 tokens x 14 px = the data's 28 px
  for phase in (config.pixel.noisy, config.pixel.finetune):
    phase.train.num_steps, phase.train.batch_size, phase.train.warmup_steps = 2, 16, 0
  config.pixel.eval.batch_size, config.pixel.eval.grid_images = 8, 0
  with pytest.MonkeyPatch.context() as mp:
    patch_small_encoder(mp)
    main.run_stages(config, root / "runs" / "demo")
  return root


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(readme_dir, index):
  code = BLOCKS[index]
  if "torch.load(" in code:
    _write_random_dinov2_checkpoint(os.fspath(readme_dir / "dinov2_vits14_pretrain.pth"))
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
  }
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=os.fspath(readme_dir),
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, f"README example {index}:\n{code}\n{proc.stderr[-3000:]}"
