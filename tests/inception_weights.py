"""Random FID Inception weights in pytorch-fid's key layout (no download), for tests."""

import numpy as np
import pytest

from fae_jax.convert import inception as convert_inception_lib

torch = pytest.importorskip("torch")


def random_state_dict(seed: int = 0, num_batches_tracked: bool = True) -> dict:
  """Random weights in pytorch-fid's key layout, scaled so activations stay O(1) to the end."""
  rng = np.random.default_rng(seed)
  sd = {}
  for rule in convert_inception_lib.param_map():
    s, key = rule.torch_shape, rule.torch_key
    if key.endswith("conv.weight"):
      v = rng.normal(size=s) * np.sqrt(2.0 / np.prod(s[1:]))
    elif key.endswith("bn.weight"):
      v = rng.uniform(0.5, 1.5, s)
    elif key.endswith("running_var"):
      v = rng.uniform(0.5, 2.0, s)
    elif key == "fc.weight":
      v = rng.normal(size=s) / np.sqrt(s[1])
    else:  # bn.bias, running_mean, fc.bias
      v = rng.normal(size=s) * 0.2
    sd[key] = torch.from_numpy(v.astype(np.float32))
    if num_batches_tracked and key.endswith("bn.weight"):
      sd[key.replace("bn.weight", "bn.num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
  return sd


def write_random_export(tmp_path, seed: int = 0):
  """Converts random weights through the real command path; returns the export directory."""
  src = tmp_path / "pt_inception-random.pth"
  torch.save(random_state_dict(seed), src)
  out = tmp_path / "inception"
  convert_inception_lib.convert_inception_file(src, out)
  return out
