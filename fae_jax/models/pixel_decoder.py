"""Pixel decoder: a ViT that maps feature tokens `[B, N, D]` to images `[B, H, W, 3]`.

FAE trains it in two steps (PAPER.md "pixel training"): first on the frozen encoder's ORIGINAL
features plus Gaussian noise (`add_feature_noise`), so it tolerates the small errors of the
feature decoder, then fine-tuned on the feature decoder's reconstructions `x_hat`.

```
tokens [B, h*w, D] --embed--> + pos --Block x depth--> norm --head--> [B, h*w, p*p*3]
                                                                  --unpatchify--> [B, h*p, w*p, 3]
```

Choices the paper leaves open, and why:
  * Output range: the head is linear and the output unbounded; targets are images in [-1, 1].
    No tanh: it saturates the gradient of exactly the pixels that are hardest to get right
    (highlights, shadows), while the L1/L2 + perceptual losses pull the output into range on
    their own (MAE/RAE decoders are linear too). Clip to [-1, 1] only when an image is saved or
    measured (`fae_jax.losses.pixel.psnr` clips).
  * Positions: a learned absolute table `[1, N, width]` (init N(0, 0.02)), as the ViT/MAE
    decoders; 2-D axial RoPE in every attention is an option (`rope=True`).
  * Blocks: the shared pre-norm `layers.Block`; default ViT layout (LayerNorm, GELU MLP, biases
    everywhere, eps 1e-6).
  * Residual stream in float32, matmuls in `dtype` (bfloat16 on TPU); params always float32;
    the image is returned in float32.

Parameter counts of the ImageNet configuration, derived: README.md, "Parameter counts".
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fae_jax import sharding
from fae_jax.models import layers
from fae_jax.models.config_base import JsonConfig

Dtype = Any

_POS = ("learned", "none")
_FFNS = ("mlp", "swiglu")
_NORMS = ("layernorm", "rmsnorm")
NOISE_MODES = ("fixed", "uniform", "none")

# The paper's sigma for DINOv2 features and RAE's tau (`noise_tau` in RAE's stage-1 model).
DEFAULT_NOISE_SIGMA = 0.4
DEFAULT_NOISE_TAU = 0.8

# name -> (width, depth, num_heads); ViT sizes of Dosovitskiy et al. / big_vision.
VARIANTS: dict[str, tuple[int, int, int]] = {
  "Ti": (192, 12, 3),
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
}

_POS_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class PixelDecoderConfig(JsonConfig):
  """Shape of the pixel decoder. Defaults: the paper's ImageNet ViT-L/16.

  Attributes:
    feature_dim: D, width of the input tokens (1536 for DINOv2-g/14 features).
    grid: `(h, w)` token grid; N = h * w; the image is `(h * patch_size, w * patch_size)`.
    width, depth, num_heads: the ViT.
    mlp_ratio: FFN width multiplier ('swiglu' uses 2/3 of it, rounded up to 8).
    ffn: 'mlp' (GELU) or 'swiglu'.
    norm: 'layernorm' or 'rmsnorm'.
    rope: 2-D axial RoPE in every attention.
    pos: 'learned' absolute position table or 'none'.
    patch_size: p, output pixels per token side.
    channels: output channels.
    norm_eps: epsilon of every norm.
    rope_theta: RoPE base frequency.
    remat: rematerialise each block in the backward pass (activation memory for compute; the
      same parameters and numbers).
  """

  feature_dim: int = 1536
  grid: tuple[int, int] = (16, 16)
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  ffn: str = "mlp"
  norm: str = "layernorm"
  rope: bool = False
  pos: str = "learned"
  patch_size: int = 16
  channels: int = 3
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  remat: bool = False

  def __post_init__(self):
    # JSON round trips turn tuples into lists; normalise so configs compare and hash equal.
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    self._validate()

  def _validate(self) -> None:
    for name, value, allowed in (
      ("pos", self.pos, _POS),
      ("ffn", self.ffn, _FFNS),
      ("norm", self.norm, _NORMS),
    ):
      if value not in allowed:
        raise ValueError(f"PixelDecoderConfig.{name}={value!r} is not one of {allowed}.")
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise ValueError(f"PixelDecoderConfig.grid must be (h, w), positive, got {self.grid}.")
    for name in ("feature_dim", "width", "num_heads", "patch_size", "channels"):
      if getattr(self, name) < 1:
        raise ValueError(f"PixelDecoderConfig.{name} must be >= 1, got {getattr(self, name)}.")
    if self.depth < 0:
      raise ValueError(f"PixelDecoderConfig.depth must be >= 0, got {self.depth}.")
    if self.width % self.num_heads:
      raise ValueError(
        f"PixelDecoderConfig.width ({self.width}) must be divisible by num_heads "
        f"({self.num_heads})."
      )
    if self.rope and self.head_dim % 4:
      raise ValueError(
        f"PixelDecoderConfig.rope needs head_dim divisible by 4, got {self.head_dim}."
      )

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def image_size(self) -> tuple[int, int]:
    """`(H, W)` of the decoded image."""
    return self.grid[0] * self.patch_size, self.grid[1] * self.patch_size

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.channels

  @classmethod
  def from_variant(cls, variant: str, **overrides: Any) -> PixelDecoderConfig:
    """`"L/16"` -> ViT-L with 16-px output patches; `overrides` set any other field.

    Sizes (width, depth, heads): Ti (192, 12, 3), S (384, 12, 6), B (768, 12, 12),
    L (1024, 24, 16).
    """
    match = re.fullmatch(r"([A-Za-z]+)/(\d+)", variant)
    if not match or match.group(1) not in VARIANTS:
      raise ValueError(
        f"Unknown pixel decoder variant {variant!r}; use NAME/PATCH with NAME one of "
        f"{sorted(VARIANTS)} (e.g. 'L/16')."
      )
    width, depth, heads = VARIANTS[match.group(1)]
    fields = {
      "width": width,
      "depth": depth,
      "num_heads": heads,
      "patch_size": int(match.group(2)),
    }
    fields.update(overrides)
    return cls(**fields)

  def block_config(self) -> layers.BlockConfig:
    return layers.block_config_of(self)


# ----------------------------------------------------------------------------------------------
# Feature noise.
# ----------------------------------------------------------------------------------------------


def add_feature_noise(
  x: jax.Array,
  rng: jax.Array | None,
  *,
  mode: str = "fixed",
  sigma: float = DEFAULT_NOISE_SIGMA,
  tau: float = DEFAULT_NOISE_TAU,
  train: bool,
) -> jax.Array:
  """Gaussian noise on the pixel decoder's input features, in training only.

  `x + s * eps`, eps ~ N(0, I), with
    * 'fixed': s = `sigma` for every sample (the paper: 0.4 for DINOv2);
    * 'uniform': s ~ U(0, `tau`) drawn per sample (RAE's `noise_tau * rand(B)`, tau 0.8 there);
      the noise std over the batch is then `tau / sqrt(3)`;
    * 'none': no noise (the fine-tuning step on `x_hat`).

  Scale: our features are DINOv2 patch tokens after the final LayerNorm with its affine removed
  (`no_affine`: per-token zero mean, unit variance), so sigma is relative to a unit per-channel
  scale (a token has norm sqrt(D)), and 0.4 means the same thing for every encoder width. The
  paper's "scaled by the embedding norm" rule for other encoders is this normalisation: with
  raw features of a different scale ('affine' or 'none'), multiply sigma by the per-channel RMS
  of the features (token norm / sqrt(D)) to keep the same signal-to-noise ratio.

  Args:
    x: features `[B, ...]` (e.g. `[B, N, D]`).
    rng: PRNG key; unused (may be None) when `train=False` or `mode='none'`.
    mode: 'fixed', 'uniform' or 'none'.
    sigma: std of 'fixed' noise.
    tau: upper bound of the per-sample std of 'uniform' noise.
    train: noise is added only when True; otherwise `x` is returned unchanged.

  Returns:
    Array of `x`'s shape and dtype (noise is drawn and added in float32).
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"Unknown feature-noise mode {mode!r}; choose one of {NOISE_MODES}.")
  if not train or mode == "none":
    return x
  if rng is None:
    raise ValueError("add_feature_noise(train=True) needs an rng key.")
  rng_scale, rng_eps = jax.random.split(rng)
  if mode == "fixed":
    scale = jnp.float32(sigma)
  else:
    scale = tau * jax.random.uniform(rng_scale, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32)
  eps = jax.random.normal(rng_eps, x.shape, jnp.float32)
  return (x.astype(jnp.float32) + scale * eps).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Model.
# ----------------------------------------------------------------------------------------------


class PixelDecoder(nn.Module):
  """Tokens `[B, N, D]` -> images `[B, h * p, w * p, C]` float32 (targets in [-1, 1]; unbounded).

  Parameters: `embed` (Dense D -> width), `pos_embed` `[1, N, width]` ('learned'),
  `blocks_{i}`, `norm`, `head` (Dense width -> p * p * C; its kernel is the "last layer" of the
  VQGAN adaptive GAN weight, see `fae_jax.losses.pixel.LAST_LAYER`).
  """

  config: PixelDecoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.config
    n, d = c.num_tokens, c.feature_dim
    if tokens.ndim != 3 or tokens.shape[1] != n or tokens.shape[2] != d:
      raise ValueError(
        f"PixelDecoder expects tokens [B, {n}, {d}] (grid {c.grid}, feature_dim {d}), got "
        f"{tuple(tokens.shape)}; check PixelDecoderConfig.grid/feature_dim against the features."
      )
    x = layers.Dense(
      c.width, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="embed"
    )(tokens).astype(jnp.float32)
    if c.pos == "learned":
      x = x + self.param("pos_embed", _POS_INIT, (1, n, c.width))
    rope = None
    if c.rope:
      cos, sin = layers.rope_2d_tables(c.grid, c.head_dim, theta=c.rope_theta)
      rope = (jnp.asarray(cos), jnp.asarray(sin))
    block = c.block_config()
    block_cls = nn.remat(layers.Block) if c.remat else layers.Block
    for i in range(c.depth):
      x = sharding.constrain_batch(
        block_cls(block, dtype=self.dtype, name=f"blocks_{i}")(x, rope=rope)
      )
    x = layers.make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm")(x)
    x = layers.Dense(
      c.patch_dim, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="head"
    )(x)
    return layers.unpatchify(x.astype(jnp.float32), c.patch_size, c.grid, c.channels)


# ----------------------------------------------------------------------------------------------
# FLOPs.
# ----------------------------------------------------------------------------------------------


def pixel_decoder_flops_per_example(config: PixelDecoderConfig, *, training: bool = False) -> float:
  """Analytic FLOPs for one example: 2 x MACs of every matmul (attention scores included).

  Norms, activations, softmax and RoPE are ignored (<1%). `training=True` returns 3x the
  forward (forward + backward); perceptual networks and the discriminator are not included.
  """
  c = config
  n, w = c.num_tokens, c.width
  block = c.block_config()
  hidden = block.hidden_dim()
  attn = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w
  if c.ffn == "swiglu":
    ffn = 2 * n * w * 2 * hidden + 2 * n * hidden * w
  else:
    ffn = 2 * 2 * n * w * hidden
  flops = float(2 * n * c.feature_dim * w + c.depth * (attn + ffn) + 2 * n * w * c.patch_dim)
  return 3.0 * flops if training else flops
