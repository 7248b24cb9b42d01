"""Latent diffusion transformer: SiT and LightningDiT as one Flax module.

The generator predicts the flow-matching velocity of a latent `x_t [B, h, w, c]` at time t,
conditioned on a class label:

```
x_t --patchify(p)--> [B, N, p*p*c] --Dense--> tokens [B, N, W] (+ fixed 2-D sin-cos positions)
t --sinusoid(1000 t)--> MLP --+
y --(label dropout)--> table -+--> cond [B, W]
tokens --depth x adaLN-Zero block(cond)--> final adaLN + Dense --unpatchify--> v [B, h, w, c]
```

An adaLN-Zero block regresses six per-channel vectors from `silu(cond)` with one zero-initialised
Dense: shift, scale and gate for the attention branch and for the FFN branch. Each branch sees
`norm(x) * (1 + scale) + shift` and its output is multiplied by `gate` before the residual add.
The final layer modulates a norm the same way (shift and scale only) and projects every token to
`p * p * c` values; both of its Dense layers start at zero. So at initialisation every block is
the identity and the velocity is exactly 0.

SiT is the plain version (GELU-tanh MLP, LayerNorm, absolute positions). LightningDiT switches on
SwiGLU, 2-D RoPE on the token grid and RMSNorm (`DitConfig.from_variant(..., lightning=True)`),
the paper's generator; each switch is its own field so the architecture ablation can be rerun.

Conventions and choices (see DESIGN.md "Flow matching time"):
  * t = 0 is data, t = 1 is noise. The time embedding is a fixed function of t only: the
    sinusoidal features of `time_scale * t` (default 1000, the scale of DiT's discrete
    timesteps, so the 256 sinusoid frequencies resolve t as finely as they do there), then
    Dense(W), SiLU, Dense(W). Sampling at any t in [0, 1] needs no other convention.
  * Labels live in `[0, num_classes)`; index `num_classes` is the null class used for
    classifier-free guidance. The table always has `num_classes + 1` rows, so a model trained
    with `class_dropout=0` still accepts null labels (their row then stays at its init).
    `num_classes=0` is an unconditional model (every label is the null class).
  * Label dropout: with `train=True` each label is replaced by the null class with probability
    `class_dropout`, using the `'dropout'` rng stream; `force_drop_ids` ([B] bool/int, nonzero =
    drop) overrides the random draw in training and evaluation alike.
  * Norms inside blocks come from `layers.make_norm` and therefore carry their affine
    parameters (DiT's LayerNorms have none; the adaLN modulation makes them redundant but
    harmless, 2 W or W params per norm).
  * `learn_sigma=True` doubles the output channels as SiT does and drops the second half in the
    forward pass; it exists only to reproduce SiT parameter counts.
  * Compute runs in `dtype` (bfloat16 on TPU), params are float32, the residual stream and the
    adaLN modulation vectors are float32, the velocity is returned in float32.

Parameter counts of the ImageNet configuration, derived: README.md, "Parameter counts".

FLOPs (`dit_flops_per_example`): 2 x MACs of every matmul, attention scores and weighted values
included; the per-example conditioning matmuls (time MLP, adaLN) are counted once per example.
Norms, activations, softmax and RoPE are ignored. A training step is 3x the forward.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fae_jax import sharding
from fae_jax.models import layers
from fae_jax.models.config_base import LatentGridConfig

Dtype = Any

# name -> (width, depth, num_heads), the DiT/SiT family sizes.
VARIANTS: dict[str, tuple[int, int, int]] = {
  "S": (384, 12, 6),
  "B": (768, 12, 12),
  "L": (1024, 24, 16),
  "XL": (1152, 28, 16),
}

_FFNS = ("mlp", "swiglu")
_NORMS = ("layernorm", "rmsnorm")
_POS = ("sincos", "learned", "none")

_zeros = nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class DitConfig(LatentGridConfig):
  """Shape of a SiT / LightningDiT generator. Defaults: LightningDiT-XL/1 on 16x16x32 latents.

  Attributes:
    input_size: latent grid side (h = w).
    in_channels: latent channels c.
    patch_size: p; the token grid is `(input_size / p)^2`.
    width, depth, num_heads: transformer shape (head dim = width / num_heads).
    mlp_ratio: FFN width multiplier (SwiGLU uses 2/3 of it, rounded up to 8).
    num_classes: class labels; index `num_classes` is the null class.
    class_dropout: probability of replacing a label by the null class in training.
    ffn: 'mlp' (GELU-tanh, SiT) or 'swiglu' (LightningDiT).
    rope: 2-D axial RoPE on q/k over the token grid (LightningDiT).
    norm: 'layernorm' (SiT) or 'rmsnorm' (LightningDiT).
    qk_norm: RMSNorm on q and k per head.
    pos_embed: absolute position embedding added to the tokens: fixed 2-D 'sincos', a
      'learned' table, or 'none'.
    learn_sigma: SiT's extra (unused) variance output channels.
    time_scale: the time embedding is a sinusoid of `time_scale * t`.
    freq_dim: number of sinusoidal time features.
    norm_eps: epsilon of every norm.
    rope_theta: RoPE base frequency.
    remat: rematerialise each block in the backward pass (memory for compute; no effect on
      parameters or outputs).
  """

  input_size: int = 16
  in_channels: int = 32
  patch_size: int = 1
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout: float = 0.1
  ffn: str = "swiglu"
  rope: bool = True
  norm: str = "rmsnorm"
  qk_norm: bool = False
  pos_embed: str = "sincos"
  learn_sigma: bool = False
  time_scale: float = 1000.0
  freq_dim: int = 256
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  remat: bool = False

  def __post_init__(self):
    def check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
      if value not in allowed:
        raise ValueError(f"DitConfig.{name}={value!r} is not one of {allowed}.")

    check("ffn", self.ffn, _FFNS)
    check("norm", self.norm, _NORMS)
    check("pos_embed", self.pos_embed, _POS)
    if self.input_size % self.patch_size:
      raise ValueError(
        f"DitConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}."
      )
    if self.width % self.num_heads:
      raise ValueError(
        f"DitConfig.width={self.width} is not divisible by num_heads={self.num_heads}."
      )
    if self.rope and self.head_dim % 4:
      raise ValueError(f"DitConfig.rope needs a head dim divisible by 4, got {self.head_dim}.")
    if self.pos_embed == "sincos" and self.width % 4:
      raise ValueError(f"pos_embed='sincos' needs width divisible by 4, got {self.width}.")
    if self.freq_dim % 2:
      raise ValueError(f"DitConfig.freq_dim must be even, got {self.freq_dim}.")
    if self.num_classes < 0 or not 0.0 <= self.class_dropout <= 1.0:
      raise ValueError("DitConfig needs num_classes >= 0 and 0 <= class_dropout <= 1.")

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def block_config(self) -> layers.BlockConfig:
    return layers.block_config_of(self, activation="gelu_tanh", qk_norm=self.qk_norm)

  @classmethod
  def from_variant(
    cls,
    variant: str,
    *,
    in_channels: int = 32,
    input_size: int = 16,
    lightning: bool = True,
    **overrides: Any,
  ) -> DitConfig:
    """Config of a named size: `"XL/1"` is width 1152, depth 28, 16 heads, patch 1.

    `lightning=True` switches on LightningDiT's SwiGLU + RoPE + RMSNorm, False gives plain SiT
    (GELU MLP, no RoPE, LayerNorm); `overrides` set any other field.
    """
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
      raise ValueError(
        f"Unknown DiT variant {variant!r}; use '<size>/<patch>' with size in {sorted(VARIANTS)}, "
        "e.g. 'XL/1'."
      )
    width, depth, heads = VARIANTS[name]
    switches = (
      {"ffn": "swiglu", "rope": True, "norm": "rmsnorm"}
      if lightning
      else {"ffn": "mlp", "rope": False, "norm": "layernorm"}
    )
    fields = {
      "input_size": input_size,
      "in_channels": in_channels,
      "patch_size": int(patch),
      "width": width,
      "depth": depth,
      "num_heads": heads,
      **switches,
    }
    fields.update(overrides)
    return cls.from_dict(fields)


# ----------------------------------------------------------------------------------------------
# Fixed embeddings.
# ----------------------------------------------------------------------------------------------


def sincos_2d_embedding(grid_size: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position table for a row-major `grid_size^2` token grid.

  The first half of the channels encodes the row, the second half the column; each half is
  `[sin(pos * f_k), cos(pos * f_k)]` with `f_k = 10000^(-k / (dim / 4))`.

  Returns:
    `[grid_size^2, dim]` float32.
  """
  quarter = dim // 4
  freqs = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

  def axis(pos: np.ndarray) -> np.ndarray:
    angles = pos.reshape(-1, 1) * freqs[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

  return np.concatenate([axis(rows), axis(cols)], axis=-1).astype(np.float32)


def timestep_features(t: jax.Array, dim: int, *, scale: float = 1000.0) -> jax.Array:
  """Sinusoidal features of `scale * t`: `[cos(s t f_k), sin(s t f_k)]`, f_k = 1e4^(-k / half).

  Args:
    t: `[B]` times in [0, 1].

  Returns:
    `[B, dim]` float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = (scale * t.astype(jnp.float32))[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`x [B, N, W] * (1 + scale [B, W]) + shift [B, W]`."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
  """`t [B] -> [B, W]`: sinusoid of `scale * t`, Dense, SiLU, Dense."""

  width: int
  freq_dim: int = 256
  scale: float = 1000.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    init = nn.initializers.normal(stddev=0.02)
    h = timestep_features(t, self.freq_dim, scale=self.scale)
    h = layers.Dense(self.width, dtype=self.dtype, kernel_init=init, name="fc1")(h)
    h = layers.Dense(self.width, dtype=self.dtype, kernel_init=init, name="fc2")(jax.nn.silu(h))
    return h.astype(jnp.float32)


class LabelEmbedder(nn.Module):
  """`y [B] -> [B, W]` from a `(num_classes + 1) x W` table, with label dropout to the null row."""

  num_classes: int
  width: int
  dropout: float = 0.0

  @nn.compact
  def __call__(
    self, y: jax.Array, *, train: bool, force_drop_ids: jax.Array | None = None
  ) -> jax.Array:
    null = jnp.full_like(y, self.num_classes)
    if force_drop_ids is not None:
      y = jnp.where(jnp.asarray(force_drop_ids) != 0, null, y)
    elif train and self.dropout > 0.0:
      drop = jax.random.uniform(self.make_rng("dropout"), y.shape) < self.dropout
      y = jnp.where(drop, null, y)
    table = nn.Embed(
      self.num_classes + 1,
      self.width,
      embedding_init=nn.initializers.normal(stddev=0.02),
      name="embedding_table",
    )
    return table(y).astype(jnp.float32)


class DitBlock(nn.Module):
  """adaLN-Zero transformer block on `x [B, N, W]` conditioned on `cond [B, W]`."""

  config: DitConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, cond: jax.Array, rope: tuple[jax.Array, jax.Array] | None
  ) -> jax.Array:
    c = self.config
    block = c.block_config()
    mod = layers.Dense(
      6 * c.width, dtype=self.dtype, kernel_init=_zeros, bias_init=_zeros, name="adaLN_modulation"
    )(jax.nn.silu(cond)).astype(jnp.float32)
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = jnp.split(mod, 6, axis=-1)

    h = layers.make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm1")(x)
    h = layers.Attention(
      num_heads=c.num_heads,
      qk_norm=c.qk_norm,
      norm_eps=c.norm_eps,
      dtype=self.dtype,
      name="attn",
    )(_modulate(h.astype(jnp.float32), shift_a, scale_a), rope=rope)
    x = x + gate_a[:, None] * h.astype(jnp.float32)

    h = layers.make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm2")(x)
    h = _modulate(h.astype(jnp.float32), shift_f, scale_f)
    if c.ffn == "swiglu":
      h = layers.SwiGLU(block.hidden_dim(), dtype=self.dtype, name="mlp")(h)
    else:
      h = layers.Mlp(block.hidden_dim(), activation=block.activation, dtype=self.dtype, name="mlp")(
        h
      )
    return x + gate_f[:, None] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) on a norm, then a zero-initialised projection to `p * p * c_out`."""

  config: DitConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    c = self.config
    mod = layers.Dense(
      2 * c.width, dtype=self.dtype, kernel_init=_zeros, bias_init=_zeros, name="adaLN_modulation"
    )(jax.nn.silu(cond)).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = layers.make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm_final")(x)
    h = _modulate(h.astype(jnp.float32), shift, scale)
    out = layers.Dense(
      c.patch_size**2 * c.out_channels,
      dtype=self.dtype,
      kernel_init=_zeros,
      bias_init=_zeros,
      name="linear",
    )(h)
    return out.astype(jnp.float32)


class Dit(nn.Module):
  """SiT / LightningDiT velocity network.

  `apply({'params': p}, x, t, y, train=True, rngs={'dropout': key})` in training (label
  dropout); `train=False` for sampling, with `force_drop_ids` (or null labels) for the
  unconditional pass of classifier-free guidance.
  """

  config: DitConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    train: bool,
    force_drop_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Velocity at `(x, t)` for labels `y`.

    Args:
      x: `[B, h, w, c]` noisy latents.
      t: `[B]` (or scalar) times in [0, 1]; 1 is pure noise.
      y: `[B]` int labels in `[0, num_classes]`; `num_classes` is the null class.
      train: apply label dropout (needs a `'dropout'` rng).
      force_drop_ids: optional `[B]`, nonzero = use the null class for that example.

    Returns:
      `[B, h, w, c]` float32 velocity.
    """
    c = self.config
    expected = (c.input_size, c.input_size, c.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(
        f"Dit expects latents [B, {expected[0]}, {expected[1]}, {expected[2]}] "
        f"(DitConfig.input_size/in_channels), got {tuple(x.shape)}."
      )
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))

    tokens = layers.patchify(x.astype(jnp.float32), c.patch_size)
    h = layers.Dense(
      c.width, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="x_embedder"
    )(tokens).astype(jnp.float32)
    if c.pos_embed == "sincos":
      h = h + jnp.asarray(sincos_2d_embedding(c.grid_size, c.width))[None]
    elif c.pos_embed == "learned":
      h = h + self.param(
        "pos_embed", nn.initializers.normal(stddev=0.02), (1, c.num_tokens, c.width)
      )

    cond = TimestepEmbedder(c.width, c.freq_dim, c.time_scale, dtype=self.dtype, name="t_embedder")(
      t
    )
    cond = cond + LabelEmbedder(c.num_classes, c.width, c.class_dropout, name="y_embedder")(
      y, train=train, force_drop_ids=force_drop_ids
    )

    rope = None
    if c.rope:
      cos, sin = layers.rope_2d_tables((c.grid_size, c.grid_size), c.head_dim, theta=c.rope_theta)
      rope = (jnp.asarray(cos), jnp.asarray(sin))
    block_cls = nn.remat(DitBlock) if c.remat else DitBlock
    for i in range(c.depth):
      h = sharding.constrain_batch(
        block_cls(c, dtype=self.dtype, name=f"blocks_{i}")(h, cond, rope)
      )

    out = FinalLayer(c, dtype=self.dtype, name="final_layer")(h, cond)
    out = layers.unpatchify(out, c.patch_size, c.grid_size)
    return out[..., : c.in_channels]


# ----------------------------------------------------------------------------------------------
# FLOPs.
# ----------------------------------------------------------------------------------------------


def dit_flops_per_example(config: DitConfig, *, training: bool = False) -> float:
  """Analytic FLOPs of one example through the generator (2 x MACs of all matmuls).

  Forward by default; `training=True` returns 3x the forward (forward + backward).
  """
  c = config
  n, w = c.num_tokens, c.width
  hidden = c.block_config().hidden_dim()
  patch_in = c.patch_size**2 * c.in_channels
  patch_out = c.patch_size**2 * c.out_channels
  ffn = (3 if c.ffn == "swiglu" else 2) * 2 * n * w * hidden
  attention = 2 * n * w * 3 * w + 2 * 2 * n * n * w + 2 * n * w * w
  adaln = 2 * w * 6 * w
  per_block = attention + ffn + adaln
  flops = (
    2 * n * patch_in * w  # x_embedder
    + 2 * (c.freq_dim * w + w * w)  # t_embedder
    + c.depth * per_block
    + 2 * w * 2 * w  # final adaLN
    + 2 * n * w * patch_out  # final linear
  )
  return 3.0 * flops if training else float(flops)
