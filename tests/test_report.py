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
  assert any("diffusion: class consistency, guided" in ln and ln.endswith("0.550") for ln in lines)
  assert any(ln.endswith("/w/eval/d.png") for ln in lines)
  assert "probe top-1 on x " not in text  # absent keys are left out, not printed as empty
  times = [ln.split(":")[1].split("(")[0].strip() for ln in lines if ln.strip().startswith("time:")]
  assert times == ["encode", "fae", "evaluate", "all stages"]
  assert lines[-1].endswith("310")
