"""FID Inception-v3: parity with torch-fidelity 0.4.0 (random weights) and the converter.

The reference is torch-fidelity's `feature_extractor_inceptionv3.py` (pure torch; TF-1 bilinear
resize and the FID-specific blocks), loaded without the package `__init__`, which imports
torchvision (its PyPI wheel cannot load beside the CPU torch here). Installed with
`pip install --no-deps torch-fidelity==0.4.0` (the Makefile's `assets` target).
"""

import importlib.util
import os
import sys
import types

import jax
import numpy as np
import pytest
from inception_weights import random_state_dict

from fae_jax.convert import inception as convert_inception_lib
from fae_jax.models import inception

torch = pytest.importorskip("torch")


def _load_reference_module():
  """torch-fidelity's Inception module, imported without running `torch_fidelity/__init__`."""
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.fail(
      "torch-fidelity is not installed: `python -m pip install --no-deps torch-fidelity==0.4.0` "
      "(done by `make assets`)."
    )
  saved = {k: v for k, v in sys.modules.items() if k.startswith("torch_fidelity")}
  package = types.ModuleType("torch_fidelity")
  package.__path__ = list(
    spec.submodule_search_locations
  )  # submodules resolve, __init__ never runs
  sys.modules["torch_fidelity"] = package
  try:
    name = "torch_fidelity.feature_extractor_inceptionv3"
    path = os.path.join(package.__path__[0], "feature_extractor_inceptionv3.py")
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    mspec.loader.exec_module(module)
    return module
  finally:
    for k in [k for k in sys.modules if k.startswith("torch_fidelity")]:
      del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  sd = random_state_dict()
  path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
  torch.save(sd, path)
  return sd, path


@pytest.fixture(scope="module")
def reference(weights):
  _, path = weights
  module = _load_reference_module()
  model = module.FeatureExtractorInceptionV3(
    "inception-v3-compat",
    ["2048", "logits_unbiased", "logits"],
    feature_extractor_weights_path=os.fspath(path),
  )
  captured = {}
  # TF `mixed_6/conv:0` = Mixed_6d.branch1x1 (conv, BN, ReLU); the ADM evaluator keeps [..., :7].
  model.Mixed_6d.branch1x1.register_forward_hook(
    lambda m, i, o: captured.__setitem__("mixed_6_conv", o.detach().clone())
  )

  def run(images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
      pool3, unbiased, logits = model(
        torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()
      )
    spatial = captured["mixed_6_conv"].permute(0, 2, 3, 1)[..., :7]
    return {
      "pool3": pool3.numpy(),
      "logits_unbiased": unbiased.numpy(),
      "logits": logits.numpy(),
      "spatial": spatial.reshape(spatial.shape[0], -1).numpy(),
    }

  return module, run


def _assert_close(ours, ref, what):
  """Within 1e-4 relative to the feature's scale (elementwise rtol plus atol = 1e-4 * max|ref|)."""
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=what)


@pytest.mark.parametrize("size", [(64, 64), (299, 299), (128, 96)])
def test_matches_torch_fidelity(weights, reference, size):
  sd, _ = weights
  _, run = reference
  params = convert_inception_lib.convert_inception(sd)
  rng = np.random.default_rng(sum(size))
  images = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
  ours = jax.jit(lambda p, x: inception.FIDInceptionV3().apply({"params": p}, x))(params, images)
  ref = run(images)
  assert ours["pool3"].shape == (2, inception.POOL_DIM)
  assert ours["spatial"].shape == (2, inception.SPATIAL_DIM)
  assert ours["logits"].shape == (2, inception.NUM_CLASSES)
  assert np.abs(ref["pool3"]).max() > 0.1  # random weights keep the activations alive
  for key in ("pool3", "spatial", "logits", "logits_unbiased"):
    _assert_close(ours[key], ref[key], f"{key} at {size}")
  # The bias is what separates the two logits (a swapped pair would pass the loop above only if
  # the reference swapped them too).
  np.testing.assert_allclose(
    ours["logits"] - ours["logits_unbiased"],
    np.broadcast_to(sd["fc.bias"].numpy(), (2, inception.NUM_CLASSES)),
    atol=1e-5,
  )


@pytest.mark.parametrize("size", [(17, 300), (512, 333), (299, 40)])
def test_resize_matches_tf1_bilinear_of_torch_fidelity(reference, size):
  module, _ = reference
  tf1 = module.interpolate_bilinear_2d_like_tensorflow1x
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 255, (2, *size, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear_tf1(x, (299, 299)))
  ref = tf1(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-4)


def test_converter_round_trip_and_strictness(weights):
  sd, _ = weights
  params = convert_inception_lib.convert_inception(sd)
  # Every tensor lands, transposed back it is the source tensor.
  n = 0
  for rule in convert_inception_lib.param_map():
    leaf = params
    for part in rule.target:
      leaf = leaf[part]
    back = {4: lambda a: a.transpose(3, 2, 0, 1), 2: lambda a: a.T}.get(leaf.ndim, lambda a: a)
    np.testing.assert_array_equal(back(leaf), sd[rule.torch_key].numpy(), err_msg=rule.torch_key)
    n += 1
  assert n == len(jax.tree.leaves(params)) == len(convert_inception_lib.expected_param_shapes())
  # With or without BatchNorm's num_batches_tracked (pytorch-fid vs a fresh state_dict()).
  without = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  assert len(without) < len(sd)
  jax.tree.map(
    np.testing.assert_array_equal, convert_inception_lib.convert_inception(without), params
  )

  broken = dict(sd)
  del broken["Mixed_6d.branch1x1.bn.running_var"]
  broken["Mixed_6d.branch1x1.bn.extra"] = torch.zeros(3)
  broken["fc.weight"] = torch.zeros(1000, 2048)
  with pytest.raises(ValueError) as err:
    convert_inception_lib.convert_inception(broken)
  msg = str(err.value)
  assert "missing checkpoint keys:\n  Mixed_6d.branch1x1.bn.running_var (192,)" in msg
  assert "unused checkpoint keys:\n  Mixed_6d.branch1x1.bn.extra" in msg
  assert "fc.weight: checkpoint (1000, 2048), model expects (1008, 2048)" in msg


def test_convert_command_writes_a_loadable_export(weights, tmp_path):
  sd, path = weights
  from absl.testing import flagsaver

  from fae_jax.convert import __main__ as convert_main

  out = tmp_path / "inception"
  with flagsaver.flagsaver(src=os.fspath(path), out=os.fspath(out)):
    convert_main.main(["convert", "inception"])
  params, meta = convert_inception_lib.load_inception(out)
  assert meta["model"] == "fid_inception_v3" and meta["source"]["num_batches_tracked"]
  assert meta["num_params"] == sum(int(np.prod(v.shape)) for k, v in sd.items() if v.ndim)
  jax.tree.map(np.testing.assert_array_equal, params, convert_inception_lib.convert_inception(sd))
  with pytest.raises(FileExistsError):
    convert_inception_lib.convert_inception_file(path, out)
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    convert_inception_lib.convert_inception_file(tmp_path / "nope.pth", tmp_path / "x")
