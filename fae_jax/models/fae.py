"""FAE: the adapter (encoder), its diagonal Gaussian posterior and the feature decoder.

FAE compresses the patch tokens of a frozen self-supervised encoder (`x: [B, N, D]`, N = h * w,
D = 1536 for DINOv2-g/14) into a narrow latent `z: [B, h, w, c]` (c = 32) with a deliberately
tiny adapter, and reconstructs the tokens with a small ViT:

```
x [B, N, D] --FaeEncoder--> (mean, logvar) [B, h, w, c] --sample--> z --FeatureDecoder--> x_hat
```

Adapter variants (`adapter_depth`, the paper's encoder-structure ablation):
  * 0: a per-token linear projection `D -> 2c` ("linear projection" row).
  * 1: the paper's adapter. `h = x + pos`; `h = act(h + Attention(norm(h)))`; `Dense(2c)(h)`.
    Attention has `adapter_heads x adapter_head_dim` (24 x 256 = 6144 inner width for DINOv2-g),
    independent of D.
  * k > 1: k full pre-norm transformer blocks (`layers.Block`, GELU MLP of `mlp_ratio * D`),
    a final norm, then `Dense(2c)` ("6-layer transformer" row). The blocks use the adapter's
    attention shape, so 24 x 256 heads make a 6-block adapter 340M parameters; set
    `adapter_head_dim=64` for a standard ViT-g-width block (the paper does not say which).

The decoder: `Dense(width)` per token, learned absolute position embedding, `decoder_depth`
pre-norm blocks (SwiGLU, RMSNorm, 2-D axial RoPE on every attention), final norm and an output
projection to D.

Choices the paper leaves open (PAPER.md "(open)"), and why:
  * Adapter norm: pre-attention LayerNorm (`adapter_norm='layernorm'`). The input tokens are
    already per-token standardised (DINOv2's final LayerNorm), so this is close to the identity
    at init, but it keeps the attention well scaled for the 'affine' and 'none' feature
    variants whose token norms vary. The residual path skips the norm, so the raw features flow
    to the projection untouched.
  * Adapter activation: exact (erf) GELU, applied to the residual sum before the projection, as
    the paper's "residual add, activation, linear" reads.
  * Adapter positions: a learned absolute table `[1, N, D]` (init N(0, 0.02)) added to the
    input stream before the attention (ViT style). DINOv2 tokens already carry position, so
    this is a small bias; the paper's parameter count suggests a table is there (see below).
    'rope' (2-D RoPE on q/k) and 'none' are options. Depth 0 ignores `adapter_pos` and
    `adapter_norm` (a per-token linear map must stay per-token) so a depth sweep needs no
    other override.
  * Posterior: `mean, logvar = split(Dense(2c))`, logvar clipped to (-30, 20) in float32 (the
    LDM `DiagonalGaussianDistribution` range), so `exp` never overflows.
  * Decoder positions: learned absolute table AND RoPE, both on by default. The paper says
    RoPE; its 170.43M parameter count is matched exactly by adding a 256 x 1536 table (below).
  * Decoder output: a final norm then a linear projection to D (`decoder_out_proj=True`). It
    works for any decoder width and any feature normalisation. The paper's count implies no
    output projection (the final RMSNorm output is x_hat, which suits per-token standardised
    targets); `decoder_out_proj=False` gives exactly that (requires width == D).
  * Biases on every Dense (qkv included, as DINOv2/timm); norm eps 1e-6; RoPE theta 1e4.
  * Residual streams are kept in float32 while matmuls run in `dtype` (bfloat16 on TPU);
    params are always float32; mean, logvar, z and x_hat are returned in float32.

Parameter counts of the ImageNet configuration, derived: README.md, "Parameter counts".

FLOPs (`fae_flops_per_example`): 2 x MACs of every matmul, attention scores and values
included; norms, activations, softmax and RoPE are ignored (<1% at ImageNet widths). A training
step costs 3x the forward (forward + backward through activations and weights); the frozen
feature encoder is not counted. ImageNet default: 111.6 GFLOPs forward per example (adapter
depth 1: 21.0, decoder: 90.6), 334.8 GFLOPs per training example.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from fae_jax import sharding
from fae_jax.models import layers
from fae_jax.models.config_base import JsonConfig

Dtype = Any

_ADAPTER_POS = ("learned", "rope", "none")
_ADAPTER_NORMS = ("layernorm", "rmsnorm", "none")
_DECODER_POS = ("learned", "none")
_FFNS = ("swiglu", "mlp")
_NORMS = ("rmsnorm", "layernorm")

_POS_INIT = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class FaeConfig(JsonConfig):
  """Shape of the FAE adapter and feature decoder. Defaults: the paper's ImageNet model.

  Attributes:
    feature_dim: D, width of the frozen encoder's patch tokens (1536 for DINOv2-g/14).
    grid: `(h, w)` token grid; N = h * w.
    latent_dim: c, latent channels.
    adapter_depth: 0 linear, 1 the paper's single attention layer, k > 1 transformer blocks.
    adapter_heads, adapter_head_dim: attention shape of the adapter (inner width is their
      product, independent of D).
    adapter_pos: 'learned' absolute table, 'rope' (2-D RoPE on q/k) or 'none'.
    adapter_norm: pre-attention norm, 'layernorm', 'rmsnorm' or 'none' ('none' only for
      depth <= 1).
    adapter_activation: applied after the residual add (depth 1) or inside the MLPs (depth > 1).
    logvar_clip: `(low, high)` clip of the posterior log-variance.
    decoder_depth, decoder_width, decoder_heads, decoder_head_dim: the feature decoder ViT.
    decoder_ffn: 'swiglu' (hidden 2/3 * mlp_ratio * width, rounded to 8) or 'mlp' (GELU).
    decoder_norm: 'rmsnorm' or 'layernorm'.
    decoder_rope: 2-D axial RoPE in every decoder attention.
    decoder_pos: 'learned' absolute table (in addition to RoPE) or 'none'.
    decoder_out_proj: final linear width -> D; False requires decoder_width == feature_dim.
    mlp_ratio: MLP width multiplier for decoder and deep-adapter blocks.
    norm_eps: epsilon of every norm.
    rope_theta: RoPE base frequency.
    remat: rematerialise each feature-decoder block in the backward pass (activation memory
      for compute; the same parameters and numbers).
  """

  feature_dim: int = 1536
  grid: tuple[int, int] = (16, 16)
  latent_dim: int = 32
  adapter_depth: int = 1
  adapter_heads: int = 24
  adapter_head_dim: int = 256
  adapter_pos: str = "learned"
  adapter_norm: str = "layernorm"
  adapter_activation: str = "gelu"
  logvar_clip: tuple[float, float] = (-30.0, 20.0)
  decoder_depth: int = 6
  decoder_width: int = 1536
  decoder_heads: int = 24
  decoder_head_dim: int = 64
  decoder_ffn: str = "swiglu"
  decoder_norm: str = "rmsnorm"
  decoder_rope: bool = True
  decoder_pos: str = "learned"
  decoder_out_proj: bool = True
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  remat: bool = False

  def __post_init__(self):
    # JSON round trips turn tuples into lists; normalise so configs compare and hash equal.
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    object.__setattr__(self, "logvar_clip", tuple(float(v) for v in self.logvar_clip))
    self._validate()

  def _validate(self) -> None:
    def check(name: str, value: Any, allowed: tuple[str, ...]) -> None:
      if value not in allowed:
        raise ValueError(f"FaeConfig.{name}={value!r} is not one of {allowed}.")

    check("adapter_pos", self.adapter_pos, _ADAPTER_POS)
    check("adapter_norm", self.adapter_norm, _ADAPTER_NORMS)
    check("decoder_pos", self.decoder_pos, _DECODER_POS)
    check("decoder_ffn", self.decoder_ffn, _FFNS)
    check("decoder_norm", self.decoder_norm, _NORMS)
    layers.get_activation(self.adapter_activation)
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise ValueError(f"FaeConfig.grid must be (h, w) with positive sizes, got {self.grid}.")
    if self.adapter_depth < 0 or self.decoder_depth < 0:
      raise ValueError("FaeConfig.adapter_depth and decoder_depth must be >= 0.")
    if self.adapter_depth > 1 and self.adapter_norm == "none":
      raise ValueError(
        "FaeConfig.adapter_norm='none' is only supported for adapter_depth <= 1; transformer "
        "blocks need 'layernorm' or 'rmsnorm'."
      )
    if self.adapter_depth >= 1 and self.adapter_pos == "rope" and self.adapter_head_dim % 4:
      raise ValueError(
        f"adapter_pos='rope' needs adapter_head_dim divisible by 4, got {self.adapter_head_dim}."
      )
    if self.decoder_rope and self.decoder_depth and self.decoder_head_dim % 4:
      raise ValueError(
        f"decoder_rope needs decoder_head_dim divisible by 4, got {self.decoder_head_dim}."
      )
    lo, hi = self.logvar_clip
    if not lo < hi:
      raise ValueError(f"FaeConfig.logvar_clip must be (low, high) with low < high, got {lo, hi}.")
    if not self.decoder_out_proj and self.decoder_width != self.feature_dim:
      raise ValueError(
        f"decoder_out_proj=False needs decoder_width ({self.decoder_width}) == feature_dim "
        f"({self.feature_dim}); set decoder_out_proj=True or match the widths."
      )

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  def adapter_block_config(self) -> layers.BlockConfig:
    """Block of a deep (depth > 1) adapter: width D, the adapter's attention shape, GELU MLP."""
    return layers.BlockConfig(
      width=self.feature_dim,
      num_heads=self.adapter_heads,
      head_dim=self.adapter_head_dim,
      mlp_hidden=int(self.mlp_ratio * self.feature_dim),
      ffn="mlp",
      activation=self.adapter_activation,
      norm=self.adapter_norm,
      norm_eps=self.norm_eps,
    )

  def decoder_block_config(self) -> layers.BlockConfig:
    hidden = layers.ffn_hidden_dim(self.decoder_ffn, self.decoder_width, self.mlp_ratio)
    return layers.BlockConfig(
      width=self.decoder_width,
      num_heads=self.decoder_heads,
      head_dim=self.decoder_head_dim,
      mlp_hidden=hidden,
      ffn=self.decoder_ffn,
      norm=self.decoder_norm,
      norm_eps=self.norm_eps,
    )


# ----------------------------------------------------------------------------------------------
# Diagonal Gaussian posterior.
# ----------------------------------------------------------------------------------------------


def std(logvar: jax.Array) -> jax.Array:
  """Standard deviation `exp(logvar / 2)`, float32."""
  return jnp.exp(0.5 * logvar.astype(jnp.float32))


def sample(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """Reparameterised sample `mean + std * eps`, eps ~ N(0, I); float32, shape of `mean`."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean.astype(jnp.float32) + std(logvar) * eps


def mode(mean: jax.Array, logvar: jax.Array | None = None) -> jax.Array:
  """Mode (= mean) of the posterior, float32. `logvar` is accepted for a uniform signature."""
  del logvar
  return mean.astype(jnp.float32)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Per-element `KL(N(mean, exp(logvar)) || N(0, 1))`, float32, shape of `mean`."""
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


@flax.struct.dataclass
class DiagonalGaussian:
  """`N(mean, diag(exp(logvar)))`, a pytree so it passes through `jit`. Shapes `[B, h, w, c]`."""

  mean: jax.Array
  logvar: jax.Array

  def sample(self, rng: jax.Array) -> jax.Array:
    return sample(self.mean, self.logvar, rng)

  def mode(self) -> jax.Array:
    return mode(self.mean)

  def std(self) -> jax.Array:
    return std(self.logvar)

  def kl(self) -> jax.Array:
    """Per-element KL to N(0, I)."""
    return kl_to_standard_normal(self.mean, self.logvar)


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


def _check_tokens(x: jax.Array, config: FaeConfig) -> None:
  n, d = config.num_tokens, config.feature_dim
  if x.ndim != 3 or x.shape[1] != n or x.shape[2] != d:
    raise ValueError(
      f"FAE encoder expects tokens [B, {n}, {d}] (grid {config.grid}, feature_dim {d}), got "
      f"{tuple(x.shape)}; check FaeConfig.grid/feature_dim against the feature encoder."
    )


def _rope_tables(config: FaeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
  cos, sin = layers.rope_2d_tables(config.grid, head_dim, theta=config.rope_theta)
  return jnp.asarray(cos), jnp.asarray(sin)


class FaeEncoder(nn.Module):
  """The FAE adapter: `x [B, N, D] -> (mean, logvar)`, each `[B, h, w, c]` float32."""

  config: FaeConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.config
    _check_tokens(x, c)
    b = x.shape[0]
    h = x.astype(jnp.float32)
    if c.adapter_depth >= 1:
      rope = None
      if c.adapter_pos == "learned":
        h = h + self.param("pos_embed", _POS_INIT, (1, c.num_tokens, c.feature_dim))
      elif c.adapter_pos == "rope":
        rope = _rope_tables(c, c.adapter_head_dim)
      if c.adapter_depth == 1:
        y = h
        if c.adapter_norm != "none":
          y = layers.make_norm(c.adapter_norm, eps=c.norm_eps, dtype=self.dtype, name="norm")(y)
        y = layers.Attention(
          num_heads=c.adapter_heads, head_dim=c.adapter_head_dim, dtype=self.dtype, name="attn"
        )(y, rope=rope)
        h = layers.get_activation(c.adapter_activation)(h + y.astype(jnp.float32))
      else:
        block = c.adapter_block_config()
        for i in range(c.adapter_depth):
          h = layers.Block(block, dtype=self.dtype, name=f"blocks_{i}")(h, rope=rope)
        h = layers.make_norm(c.adapter_norm, eps=c.norm_eps, dtype=self.dtype, name="norm")(h)
    moments = layers.Dense(
      2 * c.latent_dim, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="to_moments"
    )(h).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, *c.logvar_clip)
    shape = (b, *c.grid, c.latent_dim)
    return mean.reshape(shape), logvar.reshape(shape)


class FeatureDecoder(nn.Module):
  """Feature decoder ViT: `z [B, h, w, c] -> x_hat [B, N, D]` float32."""

  config: FaeConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = self.config
    expected = (*c.grid, c.latent_dim)
    if z.ndim != 4 or tuple(z.shape[1:]) != expected:
      raise ValueError(
        f"FeatureDecoder expects latents [B, {expected[0]}, {expected[1]}, {expected[2]}], got "
        f"{tuple(z.shape)}."
      )
    b = z.shape[0]
    x = z.reshape(b, c.num_tokens, c.latent_dim)
    x = layers.Dense(
      c.decoder_width, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="embed"
    )(x).astype(jnp.float32)
    if c.decoder_pos == "learned":
      x = x + self.param("pos_embed", _POS_INIT, (1, c.num_tokens, c.decoder_width))
    rope = _rope_tables(c, c.decoder_head_dim) if c.decoder_rope else None
    block = c.decoder_block_config()
    block_cls = nn.remat(layers.Block) if c.remat else layers.Block
    for i in range(c.decoder_depth):
      x = sharding.constrain_batch(
        block_cls(block, dtype=self.dtype, name=f"blocks_{i}")(x, rope=rope)
      )
    x = layers.make_norm(c.decoder_norm, eps=c.norm_eps, dtype=self.dtype, name="norm")(x)
    if c.decoder_out_proj:
      x = layers.Dense(
        c.feature_dim, dtype=self.dtype, kernel_init=layers.default_kernel_init, name="head"
      )(x)
    return x.astype(jnp.float32)


class Fae(nn.Module):
  """Adapter + posterior + feature decoder.

  Use `apply(params, x, rng)` for training, `apply(params, x, method=Fae.encode)` and
  `apply(params, z, method=Fae.decode)` for the stages that need one half. Parameters live
  under `encoder/` and `decoder/`.
  """

  config: FaeConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = FaeEncoder(self.config, dtype=self.dtype)
    self.decoder = FeatureDecoder(self.config, dtype=self.dtype)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [B, N, D] -> (mean, logvar)`, each `[B, h, w, c]` float32."""
    return self.encoder(x)

  def decode(self, z: jax.Array) -> jax.Array:
    """`z [B, h, w, c] -> x_hat [B, N, D]` float32."""
    return self.decoder(z)

  def __call__(
    self, x: jax.Array, rng: jax.Array | None = None, *, sample_posterior: bool = True
  ) -> dict[str, jax.Array]:
    """Full pass. `rng` is needed when `sample_posterior`; otherwise z is the posterior mean.

    Returns:
      `{'x_hat': [B, N, D], 'mean', 'logvar', 'z': [B, h, w, c]}`, all float32.
    """
    if sample_posterior and rng is None:
      raise ValueError("Fae(sample_posterior=True) needs an rng key.")
    mean, logvar = self.encode(x)
    z = sample(mean, logvar, rng) if sample_posterior else mode(mean)
    return {"x_hat": self.decode(z), "mean": mean, "logvar": logvar, "z": z}


# ----------------------------------------------------------------------------------------------
# FLOPs.
# ----------------------------------------------------------------------------------------------


def _attention_flops(n: int, width: int, heads: int, head_dim: int) -> float:
  inner = heads * head_dim
  qkv = 2 * n * width * 3 * inner
  scores_and_values = 2 * 2 * n * n * inner
  proj = 2 * n * inner * width
  return float(qkv + scores_and_values + proj)


def _ffn_flops(n: int, block: layers.BlockConfig) -> float:
  hidden = block.hidden_dim()
  if block.ffn == "swiglu":
    return float(2 * n * block.width * 2 * hidden + 2 * n * hidden * block.width)
  return float(2 * 2 * n * block.width * hidden)


def fae_flops_per_example(config: FaeConfig, *, training: bool = False) -> float:
  """Analytic FLOPs of adapter + feature decoder for one example (2 x MACs of all matmuls).

  Forward by default; `training=True` returns 3x the forward (forward + backward). The frozen
  feature encoder is not included.
  """
  c = config
  n, d = c.num_tokens, c.feature_dim
  flops = 2.0 * n * d * 2 * c.latent_dim  # to_moments
  if c.adapter_depth == 1:
    flops += _attention_flops(n, d, c.adapter_heads, c.adapter_head_dim)
  elif c.adapter_depth > 1:
    block = c.adapter_block_config()
    per_block = _attention_flops(n, d, c.adapter_heads, c.adapter_head_dim) + _ffn_flops(n, block)
    flops += c.adapter_depth * per_block
  w = c.decoder_width
  block = c.decoder_block_config()
  flops += 2.0 * n * c.latent_dim * w  # embed
  per_block = _attention_flops(n, w, c.decoder_heads, c.decoder_head_dim) + _ffn_flops(n, block)
  flops += c.decoder_depth * per_block
  if c.decoder_out_proj:
    flops += 2.0 * n * w * d
  return 3.0 * flops if training else flops
