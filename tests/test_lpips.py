"""LPIPS-VGG in Flax vs a randomly initialised PyTorch twin; converter error handling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fae_jax.convert import lpips as lpips_convert  # noqa: E402
from fae_jax.losses import pixel  # noqa: E402
from fae_jax.models.lpips import Lpips, normalize_channels  # noqa: E402

# torchvision `vgg16().features` layout: numbers are 3x3 convs (+ ReLU), 'M' a 2x2 max-pool.
_VGG16_CFG = [
  64,
  64,
  "M",
  128,
  128,
  "M",
  256,
  256,
  256,
  "M",
  512,
  512,
  512,
  "M",
  512,
  512,
  512,
  "M",
]
# LPIPS taps the ReLU after the last conv of each stage: features[3], [8], [15], [22], [29].
_TAPS = (3, 8, 15, 22, 29)


class TorchVgg16(torch.nn.Module):
  """`torchvision.models.vgg16` convolutional trunk (same `features.N` indices), no weights."""

  def __init__(self):
    super().__init__()
    layers, cin = [], 3
    for v in _VGG16_CFG:
      if v == "M":
        layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
      else:
        layers += [torch.nn.Conv2d(cin, v, kernel_size=3, padding=1), torch.nn.ReLU()]
        cin = v
    self.features = torch.nn.Sequential(*layers)


class TorchNetLin(torch.nn.Module):
  """`lpips.NetLinLayer` with dropout: `model = Sequential(Dropout, Conv1x1(C -> 1, no bias))`."""

  def __init__(self, channels):
    super().__init__()
    self.model = torch.nn.Sequential(
      torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, stride=1, padding=0, bias=False)
    )


class TorchLpipsHead(torch.nn.Module):
  def __init__(self):
    super().__init__()
    for k, c in enumerate((64, 128, 256, 512, 512)):
      setattr(self, f"lin{k}", TorchNetLin(c))


def torch_lpips(vgg, head, in0, in1):
  """LPIPS v0.1 forward (`lpips.LPIPS.forward`, `normalize=False`), NCHW inputs in [-1, 1]."""
  shift = torch.tensor([-0.030, -0.088, -0.188], dtype=in0.dtype).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450], dtype=in0.dtype).view(1, 3, 1, 1)

  def taps(x):
    out, h = [], (x - shift) / scale
    for i, layer in enumerate(vgg.features):
      h = layer(h)
      if i in _TAPS:
        out.append(h)
      if i == _TAPS[-1]:
        break
    return out

  def normalize(f, eps=1e-10):
    return f / (torch.sqrt(torch.sum(f**2, dim=1, keepdim=True)) + eps)

  total = 0
  for k, (f0, f1) in enumerate(zip(taps(in0), taps(in1), strict=True)):
    diff = (normalize(f0) - normalize(f1)) ** 2
    total = total + getattr(head, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
  return total.reshape(-1)


@pytest.fixture(scope="module")
def twin():
  torch.manual_seed(0)
  vgg, head = TorchVgg16().eval(), TorchLpipsHead().eval()
  with torch.no_grad():
    for k in range(5):
      getattr(head, f"lin{k}").model[1].weight.abs_()
  vgg_sd = {k: v.detach().clone() for k, v in vgg.state_dict().items()}
  lin_sd = {k: v.detach().clone() for k, v in head.state_dict().items()}
  return vgg, head, vgg_sd, lin_sd


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(3, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(scale=0.3, size=x.shape), -1, 1).astype(np.float32)
  y[2] = rng.uniform(-1, 1, size=(32, 32, 3))  # an unrelated pair too
  return x, y


def _reference(twin, x, y):
  vgg, head, _, _ = twin
  vgg64, head64 = vgg.double(), head.double()
  with torch.no_grad():
    to_t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)  # noqa: E731
    out = torch_lpips(vgg64, head64, to_t(x), to_t(y)).numpy()
  vgg.float(), head.float()
  return out


def test_state_dict_keys_match_the_maps(twin):
  _, _, vgg_sd, lin_sd = twin
  assert sorted(vgg_sd) == sorted(k for k, _, _ in lpips_convert.vgg_param_map())
  assert sorted(lin_sd) == sorted(k for k, _, _ in lpips_convert.lin_param_map())


def test_flax_lpips_matches_torch_twin(twin, images):
  _, _, vgg_sd, lin_sd = twin
  x, y = images
  params = lpips_convert.convert_lpips(vgg_sd, lin_sd)
  got = np.asarray(jax.jit(Lpips().apply)({"params": params}, x, y))
  want = _reference(twin, x, y)
  assert got.shape == (3,) and np.all(want > 1e-3)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)  # measured: ~4e-9
  # The loss wrapper is the batch mean of the same distances.
  np.testing.assert_allclose(float(pixel.lpips_loss(params, y, x)), want.mean(), atol=1e-5)


def test_lpips_of_identical_images_is_zero(twin, images):
  _, _, vgg_sd, lin_sd = twin
  params = lpips_convert.convert_lpips(vgg_sd, lin_sd)
  x, _ = images
  dist = np.asarray(jax.jit(Lpips().apply)({"params": params}, x, x))
  # x and y share one trunk pass (batch concatenated); compiled XLA may round the two copies
  # differently (1e-16 measured on CPU), so "zero" means zero up to float64-level rounding.
  assert dist.shape == (3,) and np.all(np.abs(dist) <= 1e-10), dist


def test_channel_normalisation_is_nan_free_on_dead_features():
  x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  x[0, 1] = 0.0  # every channel of one position is zero (all ReLUs dead)
  out = np.asarray(normalize_channels(jnp.asarray(x)))
  want = x / (np.sqrt(np.sum(x**2, -1, keepdims=True)) + 1e-10)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  np.testing.assert_array_equal(out[0, 1], 0.0)
  w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
  grad = jax.grad(lambda a: jnp.sum(w * normalize_channels(a)))(jnp.asarray(x))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_converter_names_broken_keys(twin):
  _, _, vgg_sd, lin_sd = twin
  renamed = dict(vgg_sd)
  renamed["features.10.weights"] = renamed.pop("features.10.weight")
  with pytest.raises(ValueError) as err:
    lpips_convert.convert_lpips(renamed, lin_sd)
  msg = str(err.value)
  assert "vgg: features.10.weights" in msg and "unused" in msg
  assert "vgg: features.10.weight (for net/features_10/kernel)" in msg and "missing" in msg

  bad_lin = dict(lin_sd)
  bad_lin["lin2.model.1.weight"] = torch.ones(1, 128, 1, 1)
  bad_lin["lin4.model.1.weight"] = -torch.ones(1, 512, 1, 1)
  with pytest.raises(ValueError) as err:
    lpips_convert.convert_lpips(vgg_sd, bad_lin)
  msg = str(err.value)
  assert "lin2.model.1.weight: checkpoint (1, 128, 1, 1), model expects (1, 256, 1, 1)" in msg
  assert "negative lin weights" in msg and "lin4.model.1.weight" in msg

  # torchvision checkpoints carry the classifier: dropped by default, an error otherwise.
  with_head = {**vgg_sd, "classifier.0.weight": torch.zeros(2, 2)}
  lpips_convert.convert_lpips(with_head, lin_sd)
  with pytest.raises(ValueError, match="classifier.0.weight"):
    lpips_convert.convert_lpips(with_head, lin_sd, vgg_ignored_prefixes=())


def test_convert_files_round_trip(twin, images, tmp_path):
  _, _, vgg_sd, lin_sd = twin
  vgg_path, lin_path = tmp_path / "vgg16.pth", tmp_path / "vgg.pth"
  torch.save({**vgg_sd, "classifier.6.bias": torch.zeros(1000)}, vgg_path)
  torch.save(lin_sd, lin_path)
  meta = lpips_convert.convert_lpips_files(vgg_path, lin_path, tmp_path / "lpips")
  assert meta["num_params"] == 14_714_688 + 1472  # VGG16 convs + the five lin layers
  assert len(meta["source"]["vgg"]["sha256"]) == 64
  on_disk = json.loads((tmp_path / "lpips" / lpips_convert.META_NAME).read_text())
  assert on_disk == meta
  params, _ = lpips_convert.load_lpips(tmp_path / "lpips")
  x, y = images
  np.testing.assert_allclose(
    np.asarray(Lpips().apply({"params": params}, x, y)), _reference(twin, x, y), atol=1e-5
  )
  with pytest.raises(FileExistsError):
    lpips_convert.convert_lpips_files(vgg_path, lin_path, tmp_path / "lpips")
  with pytest.raises(FileNotFoundError, match="--vgg"):
    lpips_convert.convert_lpips_files(tmp_path / "nope.pth", lin_path, tmp_path / "other")
