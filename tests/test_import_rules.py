"""The layering rules of DESIGN.md ("Layers"), checked on the source, and fresh-interpreter imports.

* Stages are peers: no stage module imports another (the registry `stages/__init__` and
  `stages/context` excepted).
* Nothing below the stages imports `fae_jax.stages`; only the entry points may.
* Model and training code never imports torch / transformers / onnx (`fae_jax/convert/` may).
* Every module imports on its own in a fresh interpreter (no import cycle hidden by import order).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fae_jax")
# Modules that may run stages: the CLI and the other top-level entry points.
ENTRY_POINTS = {"fae_jax.main", "fae_jax.aot", "fae_jax.fid", "fae_jax.multiprocess"}
STAGE_INFRA = {"fae_jax.stages", "fae_jax.stages.context"}
HEAVY = ("torch", "transformers", "onnx", "onnxruntime")


def _modules() -> dict[str, str]:
  """`{dotted module name: path}` of every module in fae_jax/."""
  out = {}
  for dirpath, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
      out[rel.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
  """Every module `module` imports (absolute names; `from a import b` gives `a` and `a.b`)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      out.add(base)
      # `from pkg import name`: the submodule `pkg.name` when there is one (else an attribute).
      out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
  return out


IMPORTS = {m: _imports(m, p) for m, p in MODULES.items()}


def _is_stage(module: str) -> bool:
  return module.startswith("fae_jax.stages.") and module not in STAGE_INFRA


def test_the_walk_sees_the_package():
  assert {"fae_jax.stages.pixel", "fae_jax.artifacts", "fae_jax.models.dit"} <= set(MODULES)
  assert "fae_jax.stages.context" in IMPORTS["fae_jax.stages.pixel"]


def test_stages_do_not_import_each_other():
  bad = {
    m: sorted(i for i in imports if _is_stage(i) and i != m)
    for m, imports in IMPORTS.items()
    if _is_stage(m)
  }
  assert not {m: v for m, v in bad.items() if v}, (
    "a stage imports another stage; read its outputs through fae_jax.artifacts / "
    "fae_jax.data.feature_cache instead"
  )


def test_only_stages_and_entry_points_import_stages():
  bad = {
    m: sorted(i for i in imports if i == "fae_jax.stages" or i.startswith("fae_jax.stages."))
    for m, imports in IMPORTS.items()
    if not m.startswith("fae_jax.stages") and m not in ENTRY_POINTS
  }
  assert not {m: v for m, v in bad.items() if v}, "a module below the stages imports fae_jax.stages"


def test_model_and_training_code_import_no_torch():
  bad = {
    m: sorted(i for i in imports if i.split(".")[0] in HEAVY)
    for m, imports in IMPORTS.items()
    if not m.startswith("fae_jax.convert")
  }
  assert not {m: v for m, v in bad.items() if v}, "torch/transformers/onnx outside fae_jax/convert"


def _fresh_import(module: str) -> tuple[str, int, str]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  proc = subprocess.run(
    [sys.executable, "-c", f"import {module}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  return module, proc.returncode, proc.stderr[-2000:]


def test_every_module_imports_in_a_fresh_interpreter():
  # `__main__` modules run their CLI on import; they are covered by their own tests.
  modules = sorted(m for m in MODULES if not m.endswith(".__main__"))
  with ThreadPoolExecutor(max_workers=4) as pool:
    results = list(pool.map(_fresh_import, modules))
  failed = {m: err for m, rc, err in results if rc != 0}
  assert not failed, "\n\n".join(f"{m}:\n{err}" for m, err in failed.items())


@pytest.mark.parametrize(
  "module", ["fae_jax.autoencoder", "fae_jax.artifacts", "fae_jax.inference"]
)
def test_public_api_imports_without_the_stages(module):
  code = f"import sys, {module}; sys.exit(any(m.startswith('fae_jax.stages') for m in sys.modules))"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, f"{module} pulls in fae_jax.stages:\n{proc.stderr[-2000:]}"
