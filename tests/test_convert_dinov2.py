"""DINOv2 weight conversion: three PyTorch naming schemes -> one Flax tree, and clear errors.

One random transformers model per architecture gives all three schemes: its `state_dict()`
(transformers 5 in-memory names), the file `save_pretrained` writes (Hub names), and the
facebookresearch layout, renamed here from the Hub names by the published correspondence.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from fae_jax.convert import dinov2 as convert
from fae_jax.models.dinov2 import Dinov2Config

WIDTH, DEPTH, HEADS = 32, 2, 4


def _hf_model(kind: str) -> torch.nn.Module:
  common = dict(
    hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=70
  )
  common["patch_size"] = 14
  if kind == "registers_swiglu":
    model = transformers.Dinov2WithRegistersModel(
      transformers.Dinov2WithRegistersConfig(num_register_tokens=4, use_swiglu_ffn=True, **common)
    )
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen))
  return model


# The facebookresearch/dinov2 names of the Hub names (the inverse of transformers'
# convert_dinov2_to_hf.py); q/k/v and the two SwiGLU inputs are fused there.
_HUB_TO_ORIGINAL = [
  (r"^embeddings\.cls_token$", "cls_token"),
  (r"^embeddings\.mask_token$", "mask_token"),
  (r"^embeddings\.register_tokens$", "register_tokens"),
  (r"^embeddings\.position_embeddings$", "pos_embed"),
  (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
  (r"^layernorm\.", "norm."),
  (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
  (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
  (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
  (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
  (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),  # norm1, norm2, mlp.fc1, mlp.fc2
]


def _hub_to_original(hub: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for key, value in hub.items():
    match = re.match(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", key)
    if match:
      continue
    for pattern, repl in _HUB_TO_ORIGINAL:
      if re.match(pattern, key):
        out[re.sub(pattern, repl, key)] = value
        break
    else:
      raise AssertionError(f"test map misses {key}")
  for n in range(DEPTH):
    for kind in ("weight", "bias"):
      parts = [
        hub[f"encoder.layer.{n}.attention.attention.{x}.{kind}"] for x in ("query", "key", "value")
      ]
      out[f"blocks.{n}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
  return out


@pytest.fixture(scope="module", params=["mlp", "registers_swiglu"])
def schemes(request, tmp_path_factory):
  model = _hf_model(request.param)
  memory = {k: v.numpy() for k, v in model.state_dict().items()}
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory)
  hub = load_file(str(directory / "model.safetensors"))
  return request.param, {"hf_memory": memory, "hf_hub": hub, "original": _hub_to_original(hub)}


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _assert_same_tree(a, b):
  fa, fb = dict(_flatten(a)), dict(_flatten(b))
  assert fa.keys() == fb.keys()
  for path in fa:
    assert fa[path].dtype == np.float32
    np.testing.assert_array_equal(fa[path], fb[path], err_msg="/".join(path))


def test_three_schemes_give_the_same_tree(schemes):
  kind, sds = schemes
  trees = {}
  for scheme, sd in sds.items():
    assert convert.detect_scheme(sd) == scheme
    trees[scheme] = convert.convert_state_dict(sd, convert.infer_config(sd, num_heads=HEADS))
  _assert_same_tree(trees["hf_memory"], trees["hf_hub"])
  _assert_same_tree(trees["hf_memory"], trees["original"])
  # The tree is exactly the model's (paths and shapes), with known values in the right place.
  config = convert.infer_config(sds["hf_memory"], num_heads=HEADS)
  flat = dict(_flatten(trees["hf_memory"]))
  assert {p: v.shape for p, v in flat.items()} == convert.expected_param_shapes(config)
  memory = sds["hf_memory"]
  np.testing.assert_array_equal(
    flat[("blocks_1", "attn", "qkv", "kernel")][:, WIDTH : 2 * WIDTH],
    memory["encoder.layer.1.attention.k_proj.weight"].T,
  )
  np.testing.assert_array_equal(
    flat[("patch_embed", "proj", "kernel")][2, 5, 1],
    memory["embeddings.patch_embeddings.projection.weight"][:, 1, 2, 5],
  )
  if kind == "registers_swiglu":
    hidden = config.mlp_hidden
    w12 = flat[("blocks_0", "mlp", "w12", "kernel")]
    np.testing.assert_array_equal(w12[:, :hidden], memory["encoder.layer.0.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(w12[:, hidden:], memory["encoder.layer.0.mlp.up_proj.weight"].T)
    np.testing.assert_array_equal(flat[("register_tokens",)], memory["embeddings.register_tokens"])


def test_infer_config_recovers_the_architecture(schemes):
  kind, sds = schemes
  registers = 4 if kind == "registers_swiglu" else 0
  for sd in sds.values():
    config = convert.infer_config(sd, num_heads=HEADS)
    expected = Dinov2Config(
      width=WIDTH,
      depth=DEPTH,
      num_heads=HEADS,
      ffn="swiglu" if registers else "mlp",
      num_registers=registers,
      pos_grid=5,
      interpolate_offset=0.0 if registers else 0.1,
      interpolate_antialias=bool(registers),
    )
    assert config == expected
  with pytest.raises(ValueError, match="pass num_heads"):
    convert.infer_config(sds["hf_hub"])
  with pytest.raises(ValueError, match="unknown Dinov2Config fields"):
    convert.infer_config(sds["hf_hub"], num_heads=HEADS, heads=4)


def test_prefixes_chunks_and_torch_tensors(schemes):
  _, sds = schemes
  config = convert.infer_config(sds["original"], num_heads=HEADS)
  ref = convert.convert_state_dict(sds["original"], config)
  original = sds["original"]

  prefixed = {"teacher.backbone." + k: v for k, v in original.items()}
  _assert_same_tree(convert.convert_state_dict(prefixed, config), ref)
  # A chunked training checkpoint (block_chunks=2: one block per chunk, global indices).
  chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in original.items()}
  _assert_same_tree(convert.convert_state_dict(chunked, config), ref)
  assert convert.infer_config(chunked, num_heads=HEADS) == config
  # torch tensors, bfloat16 included, are read without a torch import in the converter.
  as_torch = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sds["hf_memory"].items()}
  bf16 = convert.convert_state_dict(as_torch, config)
  rounded = {k: v.float().numpy() for k, v in as_torch.items()}
  _assert_same_tree(bf16, convert.convert_state_dict(rounded, config))

  odd = {"encoder_wrapper." + k: v for k, v in original.items()}
  with pytest.raises(ValueError, match="strip_prefix='encoder_wrapper.'"):
    convert.convert_state_dict(odd, config)
  _assert_same_tree(convert.convert_state_dict(odd, config, strip_prefix="encoder_wrapper."), ref)
  # A classification head next to the backbone is an unused key unless ignored explicitly.
  with_head = {"dinov2." + k: v for k, v in sds["hf_hub"].items()}
  with_head["classifier.weight"] = np.zeros((10, 2 * WIDTH), np.float32)
  with pytest.raises(ValueError, match=r"unused checkpoint keys:\n  classifier\.weight"):
    convert.convert_state_dict(with_head, config)
  _assert_same_tree(
    convert.convert_state_dict(with_head, config, ignore_prefixes=("classifier.",)), ref
  )


def test_renamed_key_is_named(schemes):
  _, sds = schemes
  sd = dict(sds["hf_hub"])
  config = convert.infer_config(sd, num_heads=HEADS)
  sd["encoder.layer.1.norm_2.weight"] = sd.pop("encoder.layer.1.norm2.weight")
  with pytest.raises(ValueError) as err:
    convert.convert_state_dict(sd, config)
  message = str(err.value)
  assert "1 unused checkpoint keys:\n  encoder.layer.1.norm_2.weight" in message
  assert (
    "1 missing checkpoint keys:\n  encoder.layer.1.norm2.weight (for blocks_1/norm2/scale)"
    in message
  )


def test_shape_mismatch_names_both_shapes(schemes):
  _, sds = schemes
  sd = dict(sds["original"])
  config = convert.infer_config(sd, num_heads=HEADS)
  sd["blocks.0.attn.proj.weight"] = np.zeros((WIDTH, WIDTH + 1), np.float32)
  sd["pos_embed"] = np.zeros((1, 17, WIDTH), np.float32)
  with pytest.raises(ValueError) as err:
    convert.convert_state_dict(sd, config)
  message = str(err.value)
  assert (
    f"blocks.0.attn.proj.weight: checkpoint ({WIDTH}, {WIDTH + 1}), model expects ({WIDTH}, {WIDTH})"
    in message
  )
  assert f"pos_embed: checkpoint (1, 17, {WIDTH}), model expects (1, 26, {WIDTH})" in message
  # A config that disagrees with the weights is reported the same way.
  wrong = Dinov2Config(**{**config.to_dict(), "depth": DEPTH + 1})
  with pytest.raises(ValueError, match=r"missing checkpoint keys:\n  \S*blocks\.2\."):
    convert.convert_state_dict(sds["original"], wrong)


def test_map_covers_published_variants():
  """The explicit map fills every parameter of the real architectures, nothing else."""
  for variant, registers in (("S/14", 0), ("g/14", 4)):
    config = Dinov2Config.from_variant(variant, num_registers=registers)
    expected = convert.expected_param_shapes(config)
    for scheme in convert.SCHEMES:
      rules = convert.param_map(config, scheme)
      assert {r.target for r in rules} == set(expected)
      sources = {key: shape for r in rules for key, shape in r.sources}
      assert len(sources) == sum(len(r.sources) for r in rules)
      # infer_config only reads shapes: check it recovers the full-size architecture.
      shapes_only = {k: types.SimpleNamespace(shape=v) for k, v in sources.items()}
      assert convert.infer_config(shapes_only) == config


def test_detect_scheme_errors():
  with pytest.raises(ValueError, match="Not a DINOv2 state dict"):
    convert.detect_scheme(["conv1.weight", "fc.weight"])
  with pytest.raises(ValueError, match="Several DINOv2 models"):
    convert.detect_scheme(["a.patch_embed.proj.weight", "b.patch_embed.proj.weight"])
  both = [
    "embeddings.patch_embeddings.projection.weight",
    "encoder.layer.0.attention.q_proj.weight",
    "encoder.layer.1.attention.attention.query.weight",
  ]
  with pytest.raises(ValueError, match="cannot tell the scheme"):
    convert.detect_scheme(both)
