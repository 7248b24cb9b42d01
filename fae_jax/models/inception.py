"""The FID Inception-v3 (TensorFlow graph `inception-2015-12-05`) in Flax, NHWC.

This is the network behind every published FID, sFID, Inception Score and improved
precision/recall number: the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`)
runs the TF graph `classify_image_graph_def.pb`; pytorch-fid and torch-fidelity reproduce the
same graph in PyTorch. It differs from torchvision's Inception-v3 in four places, all kept here:

* 1008 output classes (`fc`), not 1000;
* the average pools inside FIDInceptionA/C/E_1 exclude the zero padding from the mean
  (TF's `AvgPool` with SAME padding; PyTorch `count_include_pad=False`);
* the pool branch of the last block (FIDInceptionE_2, `Mixed_7c`) is a 3x3 *max* pool;
* BatchNorm eps is 1e-3 and every convolution is bias-free.

Input pipeline, as the TF graph does it (and torch-fidelity 0.4.0 reproduces bit-exactly on
CPU): uint8 images `[B, H, W, 3]` -> float32 in [0, 255] -> bilinear resize to 299 x 299 the
TF-1.x way (`align_corners=False`, *no* half-pixel centres: source coordinate = dst * in/out,
neighbours `floor` and `min(floor + 1, in - 1)`) -> `(x - 128) / 128`. pytorch-fid instead scales
to [0, 1] first, resizes with PyTorch's half-pixel bilinear and maps to `2x - 1`; those numbers
differ from the TF graph's (see the README's FID section), so we follow the TF graph.

Outputs (`FIDInceptionV3.__call__`), float32:
  * `pool3`   `[B, 2048]`: the global average pool after `Mixed_7c` (TF `pool_3:0`), the FID
    feature;
  * `spatial` `[B, 2023]`: the sFID feature of the ADM evaluator, TF `mixed_6/conv:0` sliced to
    its first 7 channels and flattened. `mixed_6` is the TF graph's seventh mixed block, i.e.
    `Mixed_6d` (`mixed`, `mixed_1`, `mixed_2` = Mixed_5b/c/d, `mixed_3` = Mixed_6a, `mixed_4..7`
    = Mixed_6b..e), and `conv` is its 1x1 branch after BatchNorm and ReLU (`branch1x1`): a
    `[B, 17, 17, 192]` map, of which `[..., :7]` is flattened in (h, w, c) order, as the
    evaluator's NHWC `reshape` does: 17 * 17 * 7 = 2023;
  * `logits` `[B, 1008]`: `fc(pool3)` with its bias;
  * `logits_unbiased` `[B, 1008]`: `pool3 @ fc.weight^T`, *without* the bias. The ADM evaluator's
    Inception Score takes the softmax of this (it multiplies `pool_3` by the weight of
    `softmax/logits/MatMul`, the bias is added after that op in the graph), as torch-fidelity's
    `logits_unbiased` does.

Parameter names mirror the PyTorch modules (`Conv2d_1a_3x3/conv/kernel`,
`Mixed_6d/branch1x1/bn/mean`, `fc/kernel`), so the converter's map is one line per tensor. The
network is frozen: BatchNorm statistics are ordinary parameters (`scale`, `bias`, `mean`, `var`)
of a pure inference BatchNorm, so the whole model is one `params` tree. Convolutions and the
classifier run at `Precision.HIGHEST` by default: a TPU's default float32 matmul takes bf16
passes (about three significant digits), too coarse for numbers compared across implementations.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM evaluator: `spatial[..., :7]`
SPATIAL_GRID = 17
SPATIAL_DIM = SPATIAL_GRID * SPATIAL_GRID * SPATIAL_CHANNELS  # 2023
BN_EPS = 1e-3

Precision = Any


# ----------------------------------------------------------------------------------------------
# Input pipeline.
# ----------------------------------------------------------------------------------------------


def _tf1_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Neighbour indices and weights of TF 1.x `ResizeBilinear(align_corners=False)` along one axis.

  Source coordinate of output pixel i is `i * (in / out)` (no half-pixel offset), computed in
  float32 as TF's kernel and torch-fidelity do; neighbours `lo = floor`, `hi = min(lo + 1,
  in - 1)`, weight of `hi` is the fractional part.

  Returns:
    `(lo [out], hi [out], frac [out] float32)`.
  """
  scale = np.float32(in_size / out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF 1.x bilinear resize (`align_corners=False`, legacy corner alignment), NHWC float.

  Interpolates along the width first, then the height, with the same operation order as
  torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (method 'slow').

  Args:
    images: `[B, H, W, C]` float.
    size: `(out_h, out_w)`.

  Returns:
    `[B, out_h, out_w, C]` in the dtype of `images`.
  """
  _, h, w, _ = images.shape
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return images  # scale 1: every source coordinate is an integer, the resize is the identity
  y_lo, y_hi, dy = _tf1_bilinear_taps(h, out_h)
  x_lo, x_hi, dx = _tf1_bilinear_taps(w, out_w)
  dx = jnp.asarray(dx, images.dtype)[None, None, :, None]
  dy = jnp.asarray(dy, images.dtype)[None, :, None, None]
  top = images[:, y_lo]
  bottom = images[:, y_hi]
  row0 = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx
  row1 = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
  return row0 + (row1 - row0) * dy


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (or float in [0, 255]) `[B, H, W, 3]` -> `[B, 299, 299, 3]` float32 in [-1, 1).

  The TF graph's `ResizeBilinear` to 299 x 299, then `(x - 128) / 128` (the graph's `Sub` 128
  and `Mul` 1/128; dividing is bit-identical).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"FID Inception expects images [B, H, W, 3], got shape {images.shape}.")
  x = images.astype(jnp.float32)
  x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
  return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------


class BatchNorm(nn.Module):
  """Inference BatchNorm with its running statistics as parameters (a frozen network)."""

  eps: float = BN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("mean", nn.initializers.zeros, (c,))
    var = self.param("var", nn.initializers.ones, (c,))
    return (x - mean) / jnp.sqrt(var + self.eps) * scale + bias


class BasicConv2d(nn.Module):
  """Bias-free convolution -> BatchNorm(eps 1e-3) -> ReLU, as torchvision's `BasicConv2d`.

  `padding` is `(pad_h, pad_w)` of symmetric zero padding, as PyTorch's `padding=`.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      precision=self.precision,
      name="conv",
    )(x)
    return jax.nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 / stride 1 / pad 1 average pool whose mean skips the padding (TF `AvgPool` SAME)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """35 x 35 block (`Mixed_5b/c/d`): 1x1, 5x5, double 3x3 and pool branches."""

  pool_features: int
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, padding=p, precision=self.precision, name=name
    )
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (`Mixed_6a`); unchanged from torchvision."""

  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, strides=s, padding=p, precision=self.precision, name=name
    )
    b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), p=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """17 x 17 block (`Mixed_6b..e`) with factorised 7x7 convolutions.

  Returns `(output [B, 17, 17, 768], branch1x1 [B, 17, 17, 192])`; the 1x1 branch of `Mixed_6d`
  is the sFID feature (TF `mixed_6/conv`).
  """

  channels_7x7: int
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, padding=p, precision=self.precision, name=name
    )
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), (0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), (0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), (3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), (0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (`Mixed_7a`); unchanged from torchvision."""

  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, strides=s, padding=p, precision=self.precision, name=name
    )
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """8 x 8 block with expanded 1x3 / 3x1 branches (`Mixed_7b`, `Mixed_7c`).

  `pool='avg'` is FIDInceptionE_1 (`Mixed_7b`, padding-excluding average pool); `pool='max'`
  is FIDInceptionE_2 (`Mixed_7c`), whose TF graph max-pools the pool branch (3x3, stride 1,
  padding 1 with -inf, as PyTorch's `max_pool2d`).
  """

  pool: str
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, p=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, padding=p, precision=self.precision, name=name
    )
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), (1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3_exclude_pad(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"FIDInceptionE: pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
  """`fc`: `[B, 2048] -> (x @ kernel [B, 1008], x @ kernel + bias [B, 1008])`.

  Both products are returned because the ADM Inception Score uses the one without the bias.
  """

  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased, unbiased + bias


# ----------------------------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
  """FID Inception-v3. `__call__(images)`: uint8 `[B, H, W, 3]` -> dict of float32 features.

  Attributes:
    resize_input: apply `preprocess` (TF-1 resize to 299 and scaling). `False` takes an already
      preprocessed `[B, 299, 299, 3]` float input in [-1, 1] (e.g. to compile the trunk once
      for several input sizes).
    precision: matmul/conv precision; keep `HIGHEST` for comparable numbers.

  Returns:
    `{'pool3': [B, 2048], 'spatial': [B, 2023], 'logits': [B, 1008],
    'logits_unbiased': [B, 1008]}` (see the module docstring).
  """

  resize_input: bool = True
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    x = preprocess(images) if self.resize_input else images.astype(jnp.float32)
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(
        f"FIDInceptionV3(resize_input=False) expects [B, 299, 299, 3], got {x.shape}; pass "
        "uint8 images with resize_input=True."
      )
    p = self.precision
    conv = lambda f, k, s=(1, 1), pad=(0, 0), name=None: BasicConv2d(  # noqa: E731
      f, k, strides=s, padding=pad, precision=p, name=name
    )
    x = conv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)  # 149
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = conv(64, (3, 3), pad=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # 73
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3_s2(x)  # 35
    x = FIDInceptionA(32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # 17
    x, _ = FIDInceptionC(128, precision=p, name="Mixed_6b")(x)
    x, _ = FIDInceptionC(160, precision=p, name="Mixed_6c")(x)
    x, mixed_6_conv = FIDInceptionC(160, precision=p, name="Mixed_6d")(x)
    x, _ = FIDInceptionC(192, precision=p, name="Mixed_6e")(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # 8
    x = FIDInceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits_unbiased, logits = Classifier(precision=p, name="fc")(pool3)
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    return {
      "pool3": pool3,
      "spatial": spatial,
      "logits": logits,
      "logits_unbiased": logits_unbiased,
    }
