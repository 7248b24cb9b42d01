"""Per-stage config records (issue 15): a rerun of a workdir with a different config stops with
the differing fields (old -> new) and the fix; `--redo=<stage>` makes that stage and everything
downstream again; fields that do not shape results never stop a run."""

import json
import os

import pytest
from etils import epath

from fae_jax import main, report, stage_records
from fae_jax.stages import STAGES


def _tiny(make_config):
  config = make_config()
  config.stages = ("convert", "encode", "fae")
  t = config.fae.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 2, 8, 1, 2
  t.warmup_steps = 1
  config.fae.eval.batch_size, config.fae.eval.probe_steps = 8, 5
  config.fae.eval.probe_train_examples = 16
  return config


def _listing(root) -> dict[str, float]:
  """Every file under `root` with its modification time (what a refused run must not touch)."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      out[os.path.relpath(path, root)] = os.stat(path).st_mtime_ns
  return out


def test_the_stage_graph_matches_the_registry():
  assert list(stage_records.OUTPUTS) == list(STAGES)


def test_the_rule_keeps_result_fields_and_drops_cadence(tiny_pipeline_config):
  config = _tiny(tiny_pipeline_config)
  fae = stage_records.fields(config, "fae")
  assert fae["fae.model.latent_dim"] == 4 and fae["seed"] == 0
  assert "data.num_examples" in fae and "encoder.variant" in fae  # upstream, transitively
  for dropped in (
    "fae.train.log_every",
    "fae.train.checkpoint_every",
    "fae.train.keep",
    "data.num_workers",
    "encode.batch_size",
    "encoder.source",
    "mesh.data",
    "upstream_workdir",
  ):
    assert dropped not in fae, dropped
  encode = stage_records.fields(config, "encode")
  assert not any(k.startswith("fae.") for k in encode)  # the encoder cache ignores the FAE
  assert stage_records.downstream_of("fae", config) == [
    "fae",
    "pixel",
    "latents",
    "diffusion",
    "flow",
    "evaluate",
  ]
  config.evaluate.generators = ("diffusion",)  # then evaluate does not read the flow
  assert stage_records.downstream_of("flow", config) == ["flow"]
  config.evaluate.generators = ("diffusion", "flow")
  assert stage_records.downstream_of("flow", config) == ["flow", "evaluate"]


def test_changed_field_stops_before_anything_and_redo_deletes_downstream(
  tmp_path, tiny_pipeline_config
):
  """The check on hand-made records (cheap); the pipeline test below runs it through main."""
  config = _tiny(tiny_pipeline_config)
  config.stages = ("convert", "encode", "fae", "latents")
  config.evaluate.generators = ("diffusion",)
  for stage in ("convert", "encode", "fae", "latents"):
    (tmp_path / stage_records.OUTPUTS[stage]).mkdir()
    (tmp_path / stage_records.OUTPUTS[stage] / "out.bin").write_bytes(b"x")
    stage_records.write(config, tmp_path, stage)
  report.update_report(tmp_path, "fae", {"steps": 2}, 1.0)
  report.update_report(tmp_path, "encode", {"num_examples": 64}, 1.0)
  before = _listing(tmp_path)
  config.fae.model.latent_dim = 8
  config.fae.beta = 1e-3
  with pytest.raises(stage_records.ConfigChangedError) as e:
    stage_records.check(config, tmp_path)
  message = str(e.value)
  assert "nothing was run" in message
  assert "stage fae (" in message and "fae/stage_config.json" in message
  assert "fae.model.latent_dim: 4 -> 8" in message and "fae.beta: 1e-06 -> 0.001" in message
  assert "stage latents" in message  # downstream records differ too (transitive fields)
  assert "stage encode" not in message
  assert "a new --workdir, or --redo=fae" in message
  assert "(fae, pixel, latents, diffusion, flow, evaluate)" in message
  assert _listing(tmp_path) == before  # refused: nothing touched

  stage_records.check(config, tmp_path, redo="fae")
  assert sorted(os.listdir(tmp_path)) == ["encoder", "features", "report.json"]
  assert set(json.loads((tmp_path / "report.json").read_text())) == {"encode", "stage_seconds"}
  with pytest.raises(ValueError, match="--redo=pixel: config.stages .* does not run pixel"):
    stage_records.check(config, tmp_path, redo="pixel")
  with pytest.raises(ValueError, match="--redo=fea: not a stage"):
    stage_records.check(config, tmp_path, redo="fea")


def test_redo_refuses_while_an_upstream_stage_still_differs(tmp_path, tiny_pipeline_config):
  config = _tiny(tiny_pipeline_config)
  for stage in ("encode", "fae"):
    (tmp_path / stage_records.OUTPUTS[stage]).mkdir()
    stage_records.write(config, tmp_path, stage)
  config.data.num_examples = 32
  with pytest.raises(stage_records.ConfigChangedError, match="--redo=encode") as e:
    stage_records.check(config, tmp_path, redo="fae")
  assert "data.num_examples: 64 -> 32" in str(e.value)
  assert (tmp_path / "fae" / stage_records.RECORD).exists()  # nothing deleted


def test_stage_without_a_record_is_accepted_with_a_warning(tmp_path, tiny_pipeline_config):
  config = _tiny(tiny_pipeline_config)
  (tmp_path / "fae").mkdir()  # an older workdir: outputs, no record
  with _absl_warnings() as logged:
    stage_records.check(config, tmp_path)
  assert any("no stage_config.json" in m and "accepted unchecked" in m for m in logged)


class _absl_warnings:
  """Collects absl warnings (absl logs through the `absl` std logger)."""

  def __enter__(self):
    import logging

    self.messages = []
    outer = self

    class Handler(logging.Handler):
      def emit(self, record):
        outer.messages.append(record.getMessage())

    self.handler = Handler(level=logging.WARNING)
    logging.getLogger("absl").addHandler(self.handler)
    return self.messages

  def __exit__(self, *exc):
    import logging

    logging.getLogger("absl").removeHandler(self.handler)


@pytest.mark.slow
def test_pipeline_rerun_with_changed_latent_dim(tmp_path, small_encoder, tiny_pipeline_config):
  workdir = epath.Path(tmp_path)
  config = _tiny(tiny_pipeline_config)
  first = main.run_stages(config, workdir)
  assert first["fae"]["latent_shape"] == [2, 2, 4]
  record = json.loads((workdir / "fae" / stage_records.RECORD).read_text())
  assert record["stage"] == "fae" and record["fields"]["fae.model.latent_dim"] == 4
  assert (workdir / "encoder" / stage_records.RECORD).exists()
  assert (workdir / "features" / stage_records.RECORD).exists()

  # A logging/checkpoint-only change is not a different run: everything is skipped.
  quiet = _tiny(tiny_pipeline_config)
  quiet.fae.train.log_every, quiet.fae.train.checkpoint_every = 50, 1000
  quiet.data.num_workers = 0
  assert main.run_stages(quiet, workdir) == first

  changed = _tiny(tiny_pipeline_config)
  changed.fae.model.latent_dim = 8
  before = _listing(workdir)
  with pytest.raises(stage_records.ConfigChangedError, match=r"fae\.model\.latent_dim: 4 -> 8"):
    main.run_stages(changed, workdir)
  assert _listing(workdir) == before

  features = _listing(workdir / "features")
  redone = main.run_stages(changed, workdir, redo="fae")
  assert redone["fae"]["latent_shape"] == [2, 2, 8]
  assert _listing(workdir / "features") == features  # upstream kept as it was
  record = json.loads((workdir / "fae" / stage_records.RECORD).read_text())
  assert record["fields"]["fae.model.latent_dim"] == 8
  assert main.run_stages(changed, workdir) == redone  # and now it is the workdir's config
