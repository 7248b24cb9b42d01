"""DINOv2 vision transformer (facebookresearch/dinov2) in Flax Linen, numerically faithful.

The frozen feature extractor of FAE. Parameter names mirror the original PyTorch model
(`patch_embed/proj`, `cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `blocks_N`,
`norm`), so `fae_jax.convert.dinov2` is a one-to-one map from any of the published checkpoints.

What makes it exact rather than "a ViT with DINOv2 weights":
* the position table is resized with PyTorch's bicubic kernel (`resize_pos_grid`), with the rule
  of the checkpoint family: the 0.1-offset scale-factor rule for the original (non-register)
  checkpoints, the size rule with antialiasing for the register checkpoints;
* register tokens go after the CLS token and get no position embedding;
* exact (erf) GELU, LayerNorm eps 1e-6, LayerScale on both branches, fused `qkv`.

Precision: the patch embedding and the blocks compute in `dtype` (e.g. bfloat16 on TPU/GPU);
the embeddings, the residual stream between blocks and the final LayerNorm stay in float32
(cheap, and it keeps bfloat16 features close to the float32 ones). Parameters are float32.
Every output is float32. `matmul_precision="highest"` forces full-precision float32 matmuls on
TPU/GPU (their default float32 matmul uses bfloat16 / TF32 passes); parity tests need it there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fae_jax.models.config_base import JsonConfig
from fae_jax.models.layers import Block, BlockConfig, swiglu_hidden_dim
from fae_jax.models.resize import resize_pos_grid

Dtype = Any

# Variant string -> (width, depth, num_heads, ffn). Every DINOv2 variant has head_dim 64.
VARIANTS: dict[str, tuple[int, int, int, str]] = {
  "S/14": (384, 12, 6, "mlp"),
  "B/14": (768, 12, 12, "mlp"),
  "L/14": (1024, 24, 16, "mlp"),
  "g/14": (1536, 40, 24, "swiglu"),
}


def interpolation_rule(num_registers: int) -> dict[str, Any]:
  """Position-table resize rule of the original checkpoint family.

  The original checkpoints resize with `scale_factor = (out + 0.1) / M` and no antialias; the
  register checkpoints ("Vision Transformers Need Registers") with `size=out` and antialias.
  """
  if num_registers:
    return {"interpolate_offset": 0.0, "interpolate_antialias": True}
  return {"interpolate_offset": 0.1, "interpolate_antialias": False}


@dataclasses.dataclass(frozen=True)
class Dinov2Config(JsonConfig):
  """Architecture of a DINOv2 backbone.

  Attributes:
    width: token width D.
    depth: number of transformer blocks.
    num_heads: attention heads (head_dim = width // num_heads).
    mlp_ratio: FFN hidden width / D (SwiGLU: its parameter-matched equivalent).
    ffn: 'mlp' (GELU MLP) or 'swiglu' (`SwiGLUFFNFused`, g/14).
    patch_size: square patch side in pixels.
    num_registers: register tokens (0, or 4 for the register checkpoints).
    pos_grid: side M of the pretrained position table (`[1, 1 + M*M, D]`); 37 for 518 px.
    interpolate_offset: > 0: the original scale-factor resize rule with this offset; 0: size
      rule.
    interpolate_antialias: antialiased bicubic resize of the position table.
    layerscale_init: LayerScale initial value (only matters for random init).
    layer_norm_eps: epsilon of every LayerNorm.
    qkv_bias: bias in the fused qkv projection.
  """

  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  ffn: str = "mlp"
  patch_size: int = 14
  num_registers: int = 0
  pos_grid: int = 37
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  layerscale_init: float = 1e-5
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  def __post_init__(self):
    if self.ffn not in ("mlp", "swiglu"):
      raise ValueError(f"Dinov2Config.ffn must be 'mlp' or 'swiglu', got {self.ffn!r}.")
    if self.width % self.num_heads:
      raise ValueError(
        f"Dinov2Config: width {self.width} is not divisible by num_heads {self.num_heads}."
      )
    if self.interpolate_offset < 0:
      raise ValueError(
        f"Dinov2Config.interpolate_offset must be >= 0, got {self.interpolate_offset}."
      )
    for name in ("depth", "patch_size", "pos_grid"):
      if getattr(self, name) < 1:
        raise ValueError(f"Dinov2Config.{name} must be >= 1, got {getattr(self, name)}.")
    if self.num_registers < 0:
      raise ValueError(f"Dinov2Config.num_registers must be >= 0, got {self.num_registers}.")

  @classmethod
  def from_variant(cls, variant: str, num_registers: int = 0, **overrides: Any) -> Dinov2Config:
    """Config of a published variant: 'S/14', 'B/14', 'L/14' or 'g/14'.

    The position table is the 518 px one (M = 37) and the interpolation rule that of the
    checkpoint family (see `interpolation_rule`); any field can be overridden.
    """
    if variant not in VARIANTS:
      raise ValueError(f"Unknown DINOv2 variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    width, depth, num_heads, ffn = VARIANTS[variant]
    fields = dict(
      width=width,
      depth=depth,
      num_heads=num_heads,
      ffn=ffn,
      num_registers=num_registers,
      **interpolation_rule(num_registers),
    )
    fields.update(overrides)
    return cls(**fields)

  @property
  def mlp_hidden(self) -> int:
    """FFN hidden width: `int(D * mlp_ratio)` (MLP) or `swiglu_hidden_dim` (SwiGLU)."""
    if self.ffn == "swiglu":
      return swiglu_hidden_dim(self.width, self.mlp_ratio)
    return int(self.width * self.mlp_ratio)

  @property
  def num_prefix_tokens(self) -> int:
    """CLS plus registers: the tokens before the patch tokens."""
    return 1 + self.num_registers

  def block_config(self) -> BlockConfig:
    return BlockConfig(
      width=self.width,
      num_heads=self.num_heads,
      mlp_hidden=self.mlp_hidden,
      ffn=self.ffn,
      activation="gelu",
      norm="layernorm",
      norm_eps=self.layer_norm_eps,
      layerscale=self.layerscale_init,
      qkv_bias=self.qkv_bias,
    )


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection (`patch_embed.proj`, a stride-p conv)."""

  width: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H/p, W/p, D]`."""
    p = self.patch_size
    return nn.Conv(
      self.width, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
    )(pixels)


def _no_affine_layernorm(x: jax.Array, eps: float) -> jax.Array:
  """Per-token `(x - mean) / sqrt(var + eps)` in float32 (two-pass variance, like PyTorch)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centred = x - mean
  var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(var + eps)


class Dinov2(nn.Module):
  """DINOv2 backbone.

  Attributes:
    config: architecture.
    dtype: compute dtype of the patch embedding and the blocks.
    matmul_precision: None (backend default) or a `jax.default_matmul_precision` value such as
      'highest' (exact float32 on TPU/GPU).
  """

  config: Dinov2Config
  dtype: Dtype = jnp.float32
  matmul_precision: str | None = None

  @nn.compact
  def __call__(
    self,
    pixels: jax.Array,
    *,
    masks: jax.Array | None = None,
    return_layers: Sequence[int] = (),
  ) -> dict[str, Any]:
    """Runs the backbone.

    Args:
      pixels: `[B, H, W, 3]` float images, already normalised with the ImageNet mean/std; H and
        W multiples of the patch size (need not be equal).
      masks: optional `[B, N]` bool, True where a patch token is replaced by `mask_token`
        (N = (H/p) * (W/p), row-major).
      return_layers: block indices (0-based, negative from the end) whose outputs to return.

    Returns:
      dict of float32 arrays: `cls` `[B, D]`, `registers` `[B, R, D]`, `patch` `[B, N, D]`
      (after the final LayerNorm), `patch_no_affine` `[B, N, D]` (final LayerNorm without its
      scale and bias: zero mean, unit variance per token), `prenorm` `[B, 1+R+N, D]` (tokens
      before the final norm), `layers` `{i: [B, 1+R+N, D]}` for each requested block index.
    """
    if self.matmul_precision is None:
      return self._forward(pixels, masks, return_layers)
    with jax.default_matmul_precision(self.matmul_precision):
      return self._forward(pixels, masks, return_layers)

  def _forward(
    self, pixels: jax.Array, masks: jax.Array | None, return_layers: Sequence[int]
  ) -> dict[str, Any]:
    c = self.config
    d, p, m = c.width, c.patch_size, c.pos_grid
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
      raise ValueError(f"Dinov2 expects pixels [B, H, W, 3], got shape {pixels.shape}.")
    b, height, width, _ = pixels.shape
    if height % p or width % p:
      raise ValueError(
        f"Dinov2: image size {height}x{width} is not a multiple of the patch size {p}; "
        "resize or crop the input first."
      )
    gh, gw = height // p, width // p
    layer_ids = {}
    for i in return_layers:
      if not -c.depth <= i < c.depth:
        raise ValueError(f"Dinov2: return_layers index {i} out of range for depth {c.depth}.")
      layer_ids[i] = i % c.depth

    normal = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", normal, (1, 1, d), jnp.float32)
    pos_embed = self.param("pos_embed", normal, (1, 1 + m * m, d), jnp.float32)
    if c.num_registers:
      register_tokens = self.param("register_tokens", normal, (1, c.num_registers, d), jnp.float32)
    mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), jnp.float32)

    x = PatchEmbed(d, p, dtype=self.dtype, name="patch_embed")(pixels)
    x = x.reshape(b, gh * gw, d).astype(jnp.float32)
    if masks is not None:
      if masks.shape != (b, gh * gw):
        raise ValueError(f"Dinov2: masks must be [B, N] = {(b, gh * gw)}, got {masks.shape}.")
      x = jnp.where(masks[..., None], mask_token[None], x)

    pos_grid = pos_embed[0, 1:].reshape(m, m, d)
    pos_grid = resize_pos_grid(
      pos_grid,
      (gh, gw),
      interpolate_offset=c.interpolate_offset,
      antialias=c.interpolate_antialias,
    )
    pos = jnp.concatenate([pos_embed[0, :1], pos_grid.reshape(gh * gw, d)], axis=0)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)), x], axis=1) + pos[None]
    if c.num_registers:
      regs = jnp.broadcast_to(register_tokens, (b, c.num_registers, d))
      x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)

    block_cfg = c.block_config()
    layers = {}
    for idx in range(c.depth):
      x = Block(block_cfg, dtype=self.dtype, name=f"blocks_{idx}")(x).astype(jnp.float32)
      for requested, canonical in layer_ids.items():
        if canonical == idx:
          layers[requested] = x

    # Two-pass variance in float32, like torch.nn.LayerNorm.
    normed = nn.LayerNorm(
      epsilon=c.layer_norm_eps, dtype=jnp.float32, use_fast_variance=False, name="norm"
    )(x)
    r = c.num_prefix_tokens
    return {
      "cls": normed[:, 0],
      "registers": normed[:, 1:r],
      "patch": normed[:, r:],
      "prenorm": x,
      "patch_no_affine": _no_affine_layernorm(x[:, r:], c.layer_norm_eps),
      "layers": layers,
    }
