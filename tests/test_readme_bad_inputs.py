"""README's "Bad inputs: what you see" table names tests that exist (issue 15)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index("### Bad inputs: what you see")
  return text[start : text.index("\n## ", start)]


def test_every_listed_test_exists():
  refs = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", _section())
  assert len(refs) >= 10
  for path, name in refs:
    with open(os.path.join(ROOT, path)) as f:
      source = f.read()
    if name:
      assert f"def {name}(" in source, (path, name)


def test_every_kind_is_listed():
  section = _section()
  for module in ("config_checks.py", "stage_records.py", "storage_errors.py"):
    assert module in section
  for kind in ("Encoder weights", "Data:", "truncated or corrupted", "fingerprint", "NaN/Inf"):
    assert kind in section, kind
