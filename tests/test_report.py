"""report.json helpers: atomic merge per stage and the short summary printed by main."""

from fae_jax import report


def test_update_report_merges_sections_and_times(tmp_path):
  report.update_report(tmp_path, "fae", {"feature_cosine": 0.5}, 2.0)
  report.update_report(tmp_path, "fae", {"probe_top1_x": 0.8})
  out = report.update_report(tmp_path, "encode", {"images_per_second": 10.0}, 3.0)
  assert out["fae"] == {"feature_cosine": 0.5, "probe_top1_x": 0.8}
  assert out["stage_seconds"] == {"fae": 2.0, "encode": 3.0}
  assert report.read_report(tmp_path) == out
  assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_summary_lists_present_numbers_in_pipeline_order():
  text = report.summary(
    {
      "fae": {"feature_cosine": 0.97123, "probe_top1_xhat": 0.8},
      "diffusion": {"class_consistency_guided": 0.55, "grid_png_guided": "/w/eval/d.png"},
      "stage_seconds": {"evaluate": 10.0, "encode": 100.4, "fae": 200.0},
    }
  )
  lines = text.splitlines()
  assert any("feature cosine" in ln and ln.endswith("0.971") for ln in lines)
  assert any(ln.strip().startswith("diffusion, guided") and "0.550" in ln for ln in lines)
  assert any(ln.endswith("/w/eval/d.png") for ln in lines)
  assert "probe top-1 on x " not in text  # absent keys are left out, not printed as empty
  times = [ln.split(":")[1].split("(")[0].strip() for ln in lines if ln.strip().startswith("time:")]
  assert times == ["encode", "fae", "evaluate", "all stages"]
  assert lines[-1].endswith("310")


def test_quality_table_runs_from_the_floor_to_the_generators():
  rep = {
    "real": {"fd_dinov2_floor": 1.3, "probe_top1_eval": 0.83, "num_samples": 500},
    "recon": {
      "fd_dinov2": 12.4,
      "class_consistency": 0.62,
      "fd_dinov2_noisy": 10.04,
      "class_consistency_noisy": 0.7,
    },
    "diffusion": {"fd_dinov2_guided": 16.5, "class_consistency_guided": 0.56, "fid_guided": 9.87},
    "flow": {"fd_dinov2_unguided": 20.0},
  }
  table = report.quality_table(rep).splitlines()
  assert "500" in table[0]
  header, body = table[1].split(), table[2:]
  labels = [ln.split("  ")[0] for ln in body]
  assert labels == [
    "real images (floor; train vs held-out)",
    "reconstructions, noisy-feature path",
    "reconstructions, full path",
    "diffusion, guided",
    "flow, unguided",
  ]
  # Only the columns some row has, in order; a row without a value shows '-'.
  assert header == ["FD-DINOv2", "class", "cons.", "FID"]
  cells = [ln[len(labels[0]) :].split() for ln in body]
  assert cells == [
    ["1.30", "0.830", "-"],
    ["10.04", "0.700", "-"],
    ["12.40", "0.620", "-"],
    ["16.50", "0.560", "9.87"],
    ["20.00", "-", "-"],
  ]
  # The summary prints the table once, before the stage times.
  text = report.summary({**rep, "stage_seconds": {"evaluate": 5.0}})
  assert text.count("reconstructions, full path") == 1
  assert text.index("flow, unguided") < text.index("time: evaluate")
  assert report.quality_table({"fae": {"feature_cosine": 0.9}}) == ""
