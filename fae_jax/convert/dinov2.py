"""PyTorch DINOv2 state dicts -> Flax params of `fae_jax.models.dinov2.Dinov2`.

Three naming schemes of the same weights are supported, each by an explicit map (`param_map`)
that lists every source key the config implies, its target path and its transform:

* `original`: facebookresearch/dinov2 `.pth` files and `torch.hub` models (`cls_token`,
  `pos_embed`, `blocks.N.attn.qkv.weight`, `blocks.N.mlp.w12.weight`, `norm.weight`...). The
  chunked layout of training checkpoints (`blocks.C.N.*`, from `block_chunks > 0`, where N is
  the global block index) is recognised from the presence of `blocks.0.0.norm1.weight`.
* `hf_hub`: what Hugging Face checkpoints on the Hub (and `save_pretrained` in transformers 5,
  which converts back on save) hold: `embeddings.*`, `encoder.layer.N.attention.attention.
  query|key|value`, `attention.output.dense`, `layer_scale1.lambda1`, `mlp.weights_in/out`,
  `layernorm`.
* `hf_memory`: `model.state_dict()` of transformers 5 models, renamed on load by
  `transformers/conversion_mapping.py` ("Dinov2Model"): `attention.q_proj|k_proj|v_proj|o_proj`
  and SwiGLU `mlp.gate_proj|up_proj|down_proj` (`weights_in` chunked in two along the output
  axis: gate first).

Transforms: linear `[out, in] -> [in, out]`; conv `[out, in, kh, kw] -> [kh, kw, in, out]`;
separate q/k/v (or gate/up) projections are concatenated along the output axis into the fused
`qkv` (`w12`) of the original model. Conversion fails with one message listing every unused
source key, every missing source key, every shape mismatch (both shapes) and every model
parameter the map does not fill (checked against `jax.eval_shape` of the model's init).

Prefixes: a state dict saved from a wrapper (`module.`, `backbone.`, `teacher.backbone.`,
`dinov2.`...) is handled by `strip_prefix`; by default one prefix from `KNOWN_PREFIXES` is
detected from the key that ends with the patch-embedding weight. Keys outside the prefix (e.g.
a classification head) are unused keys, hence an error, unless listed in `ignore_prefixes`.

This module does not import torch: values may be numpy arrays, torch tensors (anything with
`.detach().cpu().numpy()`, bfloat16 included) or anything `np.asarray` accepts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fae_jax.models.dinov2 import VARIANTS, Dinov2, Dinov2Config, interpolation_rule
from fae_jax.models.layers import swiglu_hidden_dim

SCHEMES = ("original", "hf_hub", "hf_memory")

# Wrapper prefixes recognised automatically; anything else needs `strip_prefix`.
KNOWN_PREFIXES = (
  "module.",
  "backbone.",
  "model.",
  "dinov2.",
  "dinov2_with_registers.",
  "teacher.backbone.",
  "student.backbone.",
  "module.backbone.",
)

# The patch-embedding weight of each family: present in every checkpoint, used to find the
# prefix and the scheme.
_PATCH_WEIGHT = {
  "original": "patch_embed.proj.weight",
  "hf": "embeddings.patch_embeddings.projection.weight",
}

ParamTree = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Transforms (torch layout -> Flax layout).
# ----------------------------------------------------------------------------------------------


def _copy(x: np.ndarray) -> np.ndarray:
  return x


def _linear_kernel(*ws: np.ndarray) -> np.ndarray:
  """`[out_i, in]` torch Linear weights -> one `[in, sum(out_i)]` Dense kernel."""
  return np.concatenate(ws, axis=0).T


def _concat(*bs: np.ndarray) -> np.ndarray:
  """Biases of the projections fused along the output axis."""
  return np.concatenate(bs, axis=0)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  """`[out, in, kh, kw]` -> HWIO `[kh, kw, in, out]`."""
  return w.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class ParamRule:
  """One Flax parameter and the source tensors it is made of.

  Attributes:
    target: path in the Flax params tree, e.g. `('blocks_0', 'attn', 'qkv', 'kernel')`.
    sources: `(source key, expected torch shape)` for each input of `transform`.
    transform: arrays in source order -> the Flax array.
  """

  target: tuple[str, ...]
  sources: tuple[tuple[str, tuple[int, ...]], ...]
  transform: Callable[..., np.ndarray]


# ----------------------------------------------------------------------------------------------
# Names of each scheme.
# ----------------------------------------------------------------------------------------------


def _original_block(n: int, chunk_size: int) -> str:
  if chunk_size:
    return f"blocks.{n // chunk_size}.{n}."
  return f"blocks.{n}."


def _top_level_names(scheme: str) -> dict[str, str]:
  """Flax name -> source key for the parameters outside the blocks."""
  if scheme == "original":
    return {
      "cls_token": "cls_token",
      "pos_embed": "pos_embed",
      "register_tokens": "register_tokens",
      "mask_token": "mask_token",
      "patch_weight": "patch_embed.proj.weight",
      "patch_bias": "patch_embed.proj.bias",
      "norm_weight": "norm.weight",
      "norm_bias": "norm.bias",
    }
  return {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "mask_token": "embeddings.mask_token",
    "patch_weight": "embeddings.patch_embeddings.projection.weight",
    "patch_bias": "embeddings.patch_embeddings.projection.bias",
    "norm_weight": "layernorm.weight",
    "norm_bias": "layernorm.bias",
  }


def _block_names(scheme: str, n: int, chunk_size: int = 0) -> dict[str, Any]:
  """Source names of block `n`: each entry a key, or a list of keys fused along the output."""
  if scheme == "original":
    b = _original_block(n, chunk_size)
    return {
      "norm1": b + "norm1",
      "qkv": [b + "attn.qkv"],
      "proj": b + "attn.proj",
      "ls1": b + "ls1.gamma",
      "norm2": b + "norm2",
      "fc1": b + "mlp.fc1",
      "fc2": b + "mlp.fc2",
      "w12": [b + "mlp.w12"],
      "w3": b + "mlp.w3",
      "ls2": b + "ls2.gamma",
    }
  b = f"encoder.layer.{n}."
  names = {
    "norm1": b + "norm1",
    "ls1": b + "layer_scale1.lambda1",
    "norm2": b + "norm2",
    "fc1": b + "mlp.fc1",
    "fc2": b + "mlp.fc2",
    "ls2": b + "layer_scale2.lambda1",
  }
  if scheme == "hf_hub":
    names |= {
      "qkv": [b + f"attention.attention.{x}" for x in ("query", "key", "value")],
      "proj": b + "attention.output.dense",
      "w12": [b + "mlp.weights_in"],
      "w3": b + "mlp.weights_out",
    }
  elif scheme == "hf_memory":
    names |= {
      "qkv": [b + f"attention.{x}_proj" for x in ("q", "k", "v")],
      "proj": b + "attention.o_proj",
      "w12": [b + "mlp.gate_proj", b + "mlp.up_proj"],
      "w3": b + "mlp.down_proj",
    }
  else:
    raise ValueError(f"Unknown DINOv2 key scheme {scheme!r}; choose one of {SCHEMES}.")
  return names


def param_map(config: Dinov2Config, scheme: str, *, chunk_size: int = 0) -> list[ParamRule]:
  """Every Flax parameter of `Dinov2(config)` with its source keys, shapes and transform.

  Args:
    config: the architecture.
    scheme: 'original', 'hf_hub' or 'hf_memory'.
    chunk_size: blocks per chunk of a chunked original checkpoint (`blocks.C.N.*`); 0 if flat.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown DINOv2 key scheme {scheme!r}; choose one of {SCHEMES}.")
  c = config
  d, p, m, h = c.width, c.patch_size, c.pos_grid, c.mlp_hidden
  top = _top_level_names(scheme)
  rules = [
    ParamRule(("cls_token",), ((top["cls_token"], (1, 1, d)),), _copy),
    ParamRule(("pos_embed",), ((top["pos_embed"], (1, 1 + m * m, d)),), _copy),
    ParamRule(("mask_token",), ((top["mask_token"], (1, d)),), _copy),
    ParamRule(
      ("patch_embed", "proj", "kernel"), ((top["patch_weight"], (d, 3, p, p)),), _conv_kernel
    ),
    ParamRule(("patch_embed", "proj", "bias"), ((top["patch_bias"], (d,)),), _copy),
    ParamRule(("norm", "scale"), ((top["norm_weight"], (d,)),), _copy),
    ParamRule(("norm", "bias"), ((top["norm_bias"], (d,)),), _copy),
  ]
  if c.num_registers:
    rules.append(
      ParamRule(("register_tokens",), ((top["register_tokens"], (1, c.num_registers, d)),), _copy)
    )

  def linear(target, names, out_total, in_dim, bias=True):
    names = [names] if isinstance(names, str) else names
    out_each = out_total // len(names)
    rules.append(
      ParamRule(
        (*target, "kernel"),
        tuple((f"{k}.weight", (out_each, in_dim)) for k in names),
        _linear_kernel,
      )
    )
    if bias:
      rules.append(
        ParamRule((*target, "bias"), tuple((f"{k}.bias", (out_each,)) for k in names), _concat)
      )

  def norm(target, name):
    rules.append(ParamRule((*target, "scale"), ((f"{name}.weight", (d,)),), _copy))
    rules.append(ParamRule((*target, "bias"), ((f"{name}.bias", (d,)),), _copy))

  for n in range(c.depth):
    names = _block_names(scheme, n, chunk_size)
    blk = f"blocks_{n}"
    norm((blk, "norm1"), names["norm1"])
    linear((blk, "attn", "qkv"), names["qkv"], 3 * d, d, bias=c.qkv_bias)
    linear((blk, "attn", "proj"), names["proj"], d, d)
    rules.append(ParamRule((blk, "ls1", "gamma"), ((names["ls1"], (d,)),), _copy))
    norm((blk, "norm2"), names["norm2"])
    if c.ffn == "swiglu":
      linear((blk, "mlp", "w12"), names["w12"], 2 * h, d)
      linear((blk, "mlp", "w3"), names["w3"], d, h)
    else:
      linear((blk, "mlp", "fc1"), names["fc1"], h, d)
      linear((blk, "mlp", "fc2"), names["fc2"], d, h)
    rules.append(ParamRule((blk, "ls2", "gamma"), ((names["ls2"], (d,)),), _copy))
  return rules


# ----------------------------------------------------------------------------------------------
# Prefix and scheme detection.
# ----------------------------------------------------------------------------------------------


def detect_prefix(keys: Iterable[str]) -> str:
  """The wrapper prefix in front of the DINOv2 keys: '' or one of `KNOWN_PREFIXES`.

  Found from the key(s) ending with a patch-embedding weight name.
  """
  keys = list(keys)
  found = set()
  for key in keys:
    for marker in _PATCH_WEIGHT.values():
      if key.endswith(marker):
        found.add(key[: -len(marker)])
  if not found:
    raise ValueError(
      "Not a DINOv2 state dict: no key ends with "
      f"{' or '.join(repr(v) for v in _PATCH_WEIGHT.values())} (first keys: {keys[:8]})."
    )
  if len(found) > 1:
    raise ValueError(
      f"Several DINOv2 models in one state dict (prefixes {sorted(found)}); pass strip_prefix "
      "to choose one and ignore_prefixes for the others."
    )
  prefix = found.pop()
  if prefix and prefix not in KNOWN_PREFIXES:
    raise ValueError(
      f"DINOv2 keys are prefixed with {prefix!r}, not a known prefix {KNOWN_PREFIXES}; pass "
      f"strip_prefix={prefix!r} explicitly."
    )
  return prefix


def _scheme_of_stripped(keys: Sequence[str]) -> str:
  keyset = set(keys)
  if _PATCH_WEIGHT["original"] in keyset:
    return "original"
  if _PATCH_WEIGHT["hf"] in keyset:
    hub = any(".attention.attention.query." in k for k in keys)
    memory = any(".attention.q_proj." in k for k in keys)
    if hub and not memory:
      return "hf_hub"
    if memory and not hub:
      return "hf_memory"
    what = "both" if hub else "neither"
    raise ValueError(
      f"Hugging Face DINOv2 keys with {what} of 'attention.attention.query' (Hub/safetensors "
      "names) and 'attention.q_proj' (transformers 5 in-memory names); cannot tell the scheme."
    )
  raise ValueError(
    "Not a DINOv2 state dict: expected 'patch_embed.proj.weight' (original) or "
    f"'embeddings.patch_embeddings.projection.weight' (Hugging Face); first keys: {keys[:8]}."
  )


def detect_scheme(keys: Iterable[str]) -> str:
  """'original', 'hf_hub' or 'hf_memory' (after a known prefix, see `detect_prefix`)."""
  keys = list(keys)
  prefix = detect_prefix(keys)
  return _scheme_of_stripped([k[len(prefix) :] for k in keys if k.startswith(prefix)])


def _strip(
  state_dict: Mapping[str, Any], strip_prefix: str | None, ignore_prefixes: Sequence[str]
) -> dict[str, Any]:
  """Drops ignored keys, then removes the prefix (detected when `strip_prefix` is None)."""
  kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_prefixes)}
  prefix = detect_prefix(kept) if strip_prefix is None else strip_prefix
  return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in kept.items()}


def _chunk_size(keys: set[str]) -> int:
  """Blocks per chunk of a chunked original checkpoint, 0 for the flat layout."""
  if "blocks.0.0.norm1.weight" not in keys:
    return 0
  n = 0
  while f"blocks.0.{n}.norm1.weight" in keys:
    n += 1
  return n


# ----------------------------------------------------------------------------------------------
# Config inference and conversion.
# ----------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
  """numpy / torch (incl. bfloat16) / array-like -> float32 numpy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  return np.asarray(value).astype(np.float32)


def _shape(value: Any) -> tuple[int, ...]:
  return tuple(int(s) for s in value.shape)


def infer_config(
  state_dict: Mapping[str, Any],
  *,
  scheme: str | None = None,
  strip_prefix: str | None = None,
  ignore_prefixes: Sequence[str] = (),
  **overrides: Any,
) -> Dinov2Config:
  """Reads the architecture off the tensor shapes.

  Depth, width, patch size, registers, FFN kind and hidden width, qkv bias and the position
  grid come from the weights; the number of heads from the width via the variant table
  (DINOv2 always uses head_dim 64); the position-resize rule is that of the checkpoint family
  (`interpolation_rule`: original checkpoints are resized with the 0.1 offset, register ones
  with antialias), whatever the naming scheme. Any `Dinov2Config` field can be overridden, e.g.
  `num_heads` for a non-standard width, or `interpolate_offset=0.0` to reproduce transformers'
  `Dinov2Model`, which resizes by size.
  """
  sd = _strip(state_dict, strip_prefix, ignore_prefixes)
  keys = set(sd)
  scheme = scheme or _scheme_of_stripped(list(sd))
  top = _top_level_names(scheme)
  chunk_size = _chunk_size(keys) if scheme == "original" else 0

  def get(key: str) -> Any:
    if key not in sd:
      raise ValueError(f"infer_config: the {scheme} state dict has no {key!r}.")
    return sd[key]

  width = _shape(get(top["cls_token"]))[-1]
  patch_size = _shape(get(top["patch_weight"]))[-1]
  num_pos = _shape(get(top["pos_embed"]))[1] - 1
  pos_grid = math.isqrt(num_pos)
  if pos_grid * pos_grid != num_pos:
    raise ValueError(f"infer_config: {num_pos} position embeddings are not a square grid.")
  num_registers = _shape(sd[top["register_tokens"]])[1] if top["register_tokens"] in sd else 0

  depth = 0
  while f"{_block_names(scheme, depth, chunk_size)['norm1']}.weight" in keys:
    depth += 1
  if depth == 0:
    raise ValueError(f"infer_config: no transformer blocks found in the {scheme} state dict.")

  names = _block_names(scheme, 0, chunk_size)
  qkv_bias = f"{names['qkv'][0]}.bias" in keys
  if f"{names['w3']}.weight" in keys:
    ffn = "swiglu"
    hidden = _shape(sd[f"{names['w3']}.weight"])[1]
    # The published g/14 rule (ratio 4 -> 2/3 of it rounded up to 8), else the exact ratio.
    mlp_ratio = 4.0 if swiglu_hidden_dim(width, 4.0) == hidden else hidden * 1.5 / width
  else:
    ffn = "mlp"
    hidden = _shape(get(f"{names['fc1']}.weight"))[0]
    mlp_ratio = hidden / width

  num_heads = {v[0]: v[2] for v in VARIANTS.values()}.get(width)
  if num_heads is None and "num_heads" not in overrides:
    raise ValueError(
      f"infer_config: width {width} is not a published DINOv2 width "
      f"({sorted(v[0] for v in VARIANTS.values())}); pass num_heads=... explicitly."
    )
  fields = dict(
    width=width,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=mlp_ratio,
    ffn=ffn,
    patch_size=patch_size,
    num_registers=num_registers,
    pos_grid=pos_grid,
    qkv_bias=qkv_bias,
    **interpolation_rule(num_registers),
  )
  known = {f.name for f in dataclasses.fields(Dinov2Config)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(
      f"infer_config: unknown Dinov2Config fields {unknown}; known: {sorted(known)}."
    )
  fields.update(overrides)
  config = Dinov2Config(**fields)
  if config.mlp_hidden != hidden:
    raise ValueError(
      f"infer_config: FFN hidden width {hidden} is not reachable with mlp_ratio "
      f"{config.mlp_ratio} ({ffn}: {config.mlp_hidden}); pass mlp_ratio=... explicitly."
    )
  return config


def expected_param_shapes(config: Dinov2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every parameter of `Dinov2(config)`, from `jax.eval_shape` of its init."""
  side = config.pos_grid * config.patch_size  # native resolution: no resize to trace
  abstract = jax.eval_shape(
    Dinov2(config).init, jax.random.key(0), jnp.zeros((1, side, side, 3), jnp.float32)
  )
  flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert_state_dict(
  state_dict: Mapping[str, Any],
  config: Dinov2Config | None = None,
  *,
  strip_prefix: str | None = None,
  ignore_prefixes: Sequence[str] = (),
) -> ParamTree:
  """Converts a DINOv2 PyTorch state dict (any of `SCHEMES`) to Flax params.

  Args:
    state_dict: key -> tensor/array.
    config: the architecture; inferred from the shapes (`infer_config`) when None.
    strip_prefix: prefix to remove from every key; None detects '' or one of `KNOWN_PREFIXES`.
    ignore_prefixes: source keys starting with any of these are dropped before conversion
      (e.g. `('classifier.',)` for a classification head).

  Returns:
    The params tree (nested dicts of float32 numpy arrays) to use as
    `Dinov2(config).apply({'params': tree}, pixels)`.

  Raises:
    ValueError: naming every unused source key, missing source key, shape mismatch (with
      both shapes) and model parameter left unfilled.
  """
  sd = _strip(state_dict, strip_prefix, ignore_prefixes)
  scheme = _scheme_of_stripped(list(sd))
  if config is None:
    config = infer_config(sd, scheme=scheme, strip_prefix="")
  rules = param_map(config, scheme, chunk_size=_chunk_size(set(sd)) if scheme == "original" else 0)
  expected = expected_param_shapes(config)

  missing, mismatched, used = [], [], set()
  flat: dict[tuple[str, ...], np.ndarray] = {}
  for rule in rules:
    arrays, ok = [], True
    for key, shape in rule.sources:
      used.add(key)
      if key not in sd:
        missing.append(f"{key} (for {'/'.join(rule.target)})")
        ok = False
        continue
      got = _shape(sd[key])
      if got != shape:
        mismatched.append(f"{key}: checkpoint {got}, model expects {shape}")
        ok = False
        continue
      arrays.append(sd[key])
    if ok:
      flat[rule.target] = rule.transform(*[_to_numpy(a) for a in arrays])

  unused = sorted(set(sd) - used)
  targets = {rule.target for rule in rules}
  unfilled = sorted("/".join(t) for t in set(expected) - targets)
  unknown_targets = sorted("/".join(t) for t in targets - set(expected))
  bad_targets = [
    f"{'/'.join(t)}: converted {a.shape}, model {expected[t]}"
    for t, a in flat.items()
    if t in expected and tuple(a.shape) != expected[t]
  ]
  problems = []
  for title, items in (
    ("unused checkpoint keys", unused),
    ("missing checkpoint keys", missing),
    ("shape mismatches", mismatched),
    ("model parameters not filled by the map", unfilled),
    ("map targets the model does not have", unknown_targets),
    ("converted shapes differ from the model's", bad_targets),
  ):
    if items:
      problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
  if problems:
    raise ValueError(
      f"Cannot convert the {scheme} DINOv2 state dict to {config}:\n" + "\n".join(problems)
    )

  tree: ParamTree = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree
