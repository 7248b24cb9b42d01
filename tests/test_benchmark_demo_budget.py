"""`benchmarks/demo_budget.py`: a finished run's train FLOPs from its own `config.json`.

The run's config goes through JSON (`python -m fae_jax.main` writes it with
`to_json_best_effort`: tuples become lists), so the counts are checked against the live
ConfigDict's steps; the frozen networks' FLOPs against the perceptual term's schedule; the loop
seconds against both train-log formats; the comparison against hand-computed numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import pytest

from configs import demo
from fae_jax import aot, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  path = os.path.join(ROOT, "benchmarks", "demo_budget.py")
  spec = importlib.util.spec_from_file_location("demo_budget_under_test", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
  spec.loader.exec_module(module)
  return module


def _write_run(tmp_path, config, logs, stages):
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  for rel, records in logs.items():
    (tmp_path / rel).mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    (tmp_path / rel / "train_log.jsonl").write_text(text)
  (tmp_path / "report.json").write_text(json.dumps({"stage_seconds": stages}))
  return tmp_path


def test_train_flops_from_the_runs_json_config_and_its_loop_seconds(tmp_path):
  bench = _bench()
  config = demo.get_config("tiny")
  logs = {
    "fae": [{"step": 5, "uptime": 3.0}, {"step": 20, "uptime": 9.5}],  # before the time split
    "pixel/noisy": [{"step": 4, "uptime": 2.0}, {"step": 4, "time/total_s": 2.5}],
  }
  run = _write_run(tmp_path, config, logs, {"fae": 10.0, "pixel": 6.0})
  rows = {r.name: r for r in bench.phases(run, bench.load_config(run))}
  assert list(rows) == ["fae", "pixel/noisy", "pixel/finetune", "diffusion", "flow"]

  mesh = sharding.make_mesh(-1, 1, jax.devices()[:1])
  for step, name, prefix in bench.PHASES:
    spec = aot.build_step(step, config, mesh)  # the live config, not its JSON
    steps = int(bench._node(config, prefix).train.num_steps)
    assert rows[name].steps == steps
    assert rows[name].batch == int(bench._node(config, prefix).train.batch_size)
    assert rows[name].model_flops == pytest.approx(spec.analytic_flops * steps, rel=1e-12)
  assert rows["fae"].seconds == 9.5  # the last uptime
  assert rows["pixel/noisy"].seconds == 2.5  # time/total_s over uptime
  assert rows["diffusion"].seconds is None  # no log: no rate
  assert rows["fae"].frozen_flops == rows["pixel/noisy"].frozen_flops == 0.0
  assert rows["pixel/finetune"].frozen_flops > 0  # the FAE forward at least


def test_perceptual_flops_follow_perc_every_and_perc_examples():
  bench = _bench()
  config = demo.get_config("tiny")
  geo = aot._geometry(config)
  loss = config.pixel.loss
  assert loss.perceptual == "dino" and tuple(loss.perc_phases) == ("finetune",)

  def frozen(every, examples):
    loss.perc_every, loss.perc_examples = every, examples
    return bench.frozen_flops_per_step("pixel_finetune", config, geo)

  encoder = aot.encoder_flops_per_example(geo, aot._encoder_params(geo))
  assert encoder > 0
  batch = config.pixel.finetune.train.batch_size
  # forward + backward to the image (2x forward) on `examples` of every `every`-th step
  assert frozen(1, 4) - frozen(2, 4) == pytest.approx(2 * encoder * 4 / 2, rel=1e-9)
  assert frozen(1, 0) - frozen(1, 4) == pytest.approx(2 * encoder * (batch - 4), rel=1e-9)
  loss.perc_weight = 0.0
  assert frozen(1, 4) == pytest.approx(frozen(2, 4))  # the FAE forward only
  assert bench.frozen_flops_per_step("pixel", config, geo) == 0.0  # not a perceptual phase


def test_compare_gives_the_rate_the_last_run_would_need():
  bench = _bench()
  a = [bench.Phase("fae", 10, 8, 100e9, 0.0, 2.0), bench.Phase("flow", 10, 8, 50e9, 50e9, 2.0)]
  b = [bench.Phase("fae", 10, 8, 300e9, 0.0, 3.0), bench.Phase("flow", 10, 8, 100e9, 0.0, 2.0)]
  c = bench.compare((a, {"fae": 3.0, "flow": 2.5, "encode": 5.0}), (b, {"fae": 3.5, "flow": 2.5}))
  assert c["flops_ratio"] == pytest.approx(400 / 200)
  assert c["rate_a_gflops"] == pytest.approx(50.0)
  assert c["rate_b_gflops"] == pytest.approx(80.0)
  # b's stages outside its loops: 6.0 - 5.0 = 1 s, so its loops may take 10.5 - 1 = 9.5 s
  assert c["train_budget_s"] == pytest.approx(9.5)
  assert c["needed_rate_gflops"] == pytest.approx(400 / 9.5)
  assert c["needed_speedup"] == pytest.approx(5.0 / 9.5)


def test_a_directory_that_is_not_a_run_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json into its --workdir"):
    _bench().load_config(tmp_path)
