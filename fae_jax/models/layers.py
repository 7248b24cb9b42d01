"""Transformer layers shared by every model in fae_jax.

The frozen DINOv2 encoder, the FAE adapter, the feature and pixel decoders and the generators all
build on these modules, so there is one attention, one MLP and one block implementation.

Parameter names mirror the original DINOv2 / timm PyTorch modules (`qkv`, `proj`, `fc1`, `fc2`,
`w12`, `w3`, `ls1.gamma`, `norm1`...), which keeps the weight-conversion maps one-to-one.

Shapes: tokens are `[B, N, D]`; attention heads are laid out `[B, N, H, Dh]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

default_kernel_init = nn.initializers.xavier_uniform()


class Dense(nn.Module):
  """`flax.linen.Dense` (same parameters, initialisers, dtype promotion and outputs), with the
  matmul on a 2-D `[tokens, features]` view of the input.

  `nn.Dense` contracts the last axis of a `[B, N, D]` input directly; the gradient of its kernel
  is then a dot_general over two batch-like axes, which XLA's CPU backend lowers to a transposed
  copy and a slow matmul: 3-4x the forward matmul's time on the demo's and LightningDiT-S's
  shapes (`benchmarks/demo_steps.py`; README "Speed of the demo's steps"). Flattening the leading
  axes first makes every matmul of the forward and backward pass a plain 2-D GEMM (the reshapes
  are layout-only). For TPU the AOT compiles of the paper's steps count the same XLA FLOPs with
  either form (README, "Checked for TPU from a CPU (AOT)").
  """

  features: int
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    in_features = jnp.shape(inputs)[-1]
    kernel = self.param("kernel", self.kernel_init, (in_features, self.features), self.param_dtype)
    bias = (
      self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    lead = inputs.shape[:-1]
    y = jnp.dot(inputs.reshape(-1, in_features), kernel, precision=self.precision)
    y = y.reshape(*lead, self.features)
    if bias is not None:
      y = y + bias
    return y


_SQRT_HALF = 0.7071067811865476


def gelu_exact(x: jax.Array) -> jax.Array:
  """The erf GELU of `torch.nn.GELU()` (DINOv2, ViT); jax's default is the tanh approximation.

  Computed as PyTorch does, `0.5 * x * (1 + erf(x / sqrt(2)))`. `jax.nn.gelu(approximate=False)`
  writes the same function with `erfc(-x / sqrt(2))`, whose XLA CPU lowering is a select-heavy
  fusion, recomputed in the backward pass: the erf form runs the forward and backward of the
  demo's MLPs faster (README, "Speed of the demo's steps") and differs from it by < 1e-6 (tested).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": gelu_exact,
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "silu": jax.nn.silu,
  "relu": jax.nn.relu,
  "identity": lambda x: x,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def make_norm(kind: str, *, eps: float, dtype: Dtype, name: str | None = None) -> nn.Module:
  """`layernorm` (with bias, as in ViT/DINOv2) or `rmsnorm` (scale only, LightningDiT)."""
  if kind == "layernorm":
    # Two-pass variance, as PyTorch computes it (exact on checkpoints with large activations).
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)
  if kind == "rmsnorm":
    return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name)
  raise ValueError(f"Unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'.")


def swiglu_hidden_dim(width: int, mlp_ratio: float, multiple_of: int = 8) -> int:
  """Hidden width of a SwiGLU FFN with the parameter count of a `mlp_ratio` MLP.

  2/3 of the MLP hidden width rounded up to a multiple of 8: the rule of DINOv2's
  `SwiGLUFFNFused` (g/14: 1536 * 4 -> 4096) and of LightningDiT.
  """
  hidden = int(width * mlp_ratio)
  return (int(hidden * 2 / 3) + multiple_of - 1) // multiple_of * multiple_of


def ffn_hidden_dim(ffn: str, width: int, mlp_ratio: float) -> int:
  """Hidden width of a block's FFN: `mlp_ratio * width` for 'mlp', its SwiGLU equivalent else."""
  if ffn == "swiglu":
    return swiglu_hidden_dim(width, mlp_ratio)
  return int(mlp_ratio * width)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (2-D, axial).
# ----------------------------------------------------------------------------------------------


def rope_2d_tables(
  grid_hw: tuple[int, int], head_dim: int, *, theta: float = 10000.0, num_prefix: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Axial 2-D RoPE tables for a row-major `h x w` token grid.

  Half of the rotary pairs encode the row, half the column (as in LightningDiT / EVA). Prefix
  tokens (class or register tokens placed before the grid) get the identity rotation.

  Returns:
    `(cos, sin)`, each `[num_prefix + h * w, head_dim // 2]` float32.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}.")
  h, w = grid_hw
  quarter = head_dim // 4
  inv_freq = 1.0 / (theta ** (np.arange(quarter, dtype=np.float64) / quarter))
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ang_r = rows.reshape(-1, 1) * inv_freq[None]  # [N, quarter]
  ang_c = cols.reshape(-1, 1) * inv_freq[None]
  angles = np.concatenate([ang_r, ang_c], axis=-1)  # [N, head_dim // 2]
  angles = np.concatenate([np.zeros((num_prefix, head_dim // 2)), angles], axis=0)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates interleaved pairs `(x[2i], x[2i+1])` of `x: [B, N, H, Dh]` by per-token angles.

  `cos`/`sin`: `[N, Dh // 2]`.
  """
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x1, x2 = x[..., 0], x[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
  return out.reshape(*out.shape[:-2], -1).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C] -> [B, (H/p) * (W/p), p * p * C]`.

  Tokens are row-major over the patch grid; inside a patch the order is `(py, px, c)`.
  `unpatchify` is its exact inverse. One layout for every model (DiT, TarFlow, pixel decoder).
  """
  if x.ndim != 4:
    raise ValueError(f"patchify expects images [B, H, W, C], got {tuple(x.shape)}.")
  b, height, width, c = x.shape
  p = patch_size
  if height % p or width % p:
    raise ValueError(f"patchify: image {height}x{width} is not divisible by patch size {p}.")
  h, w = height // p, width // p
  x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, p * p * c)


def unpatchify(
  tokens: jax.Array, patch_size: int, grid: int | tuple[int, int], channels: int | None = None
) -> jax.Array:
  """`[B, h * w, p * p * C] -> [B, h * p, w * p, C]`; the exact inverse of `patchify`.

  `grid` is `(h, w)` or `h` for a square grid; `channels` defaults to what the width implies.
  """
  h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
  p = patch_size
  c = tokens.shape[-1] // (p * p) if channels is None else channels
  if tokens.ndim != 3 or tokens.shape[1] != h * w or tokens.shape[2] != p * p * c:
    raise ValueError(
      f"unpatchify expects tokens [B, {h * w}, {p * p * c}] (grid {(h, w)}, patch {p}, "
      f"{c} channels), got {tuple(tokens.shape)}."
    )
  b = tokens.shape[0]
  x = tokens.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


class LayerScale(nn.Module):
  """Per-channel learned scale (`ls1.gamma` in DINOv2)."""

  init_value: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  """Two-layer MLP `fc1 -> act -> fc2`."""

  hidden_dim: int
  out_dim: int | None = None
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = self.out_dim or x.shape[-1]
    x = Dense(self.hidden_dim, dtype=self.dtype, kernel_init=default_kernel_init, name="fc1")(x)
    x = get_activation(self.activation)(x)
    return Dense(out_dim, dtype=self.dtype, kernel_init=default_kernel_init, name="fc2")(x)


class SwiGLU(nn.Module):
  """SwiGLU FFN with the fused input projection of DINOv2's `SwiGLUFFNFused`.

  `w12` projects to `2 * hidden_dim`; its first half is the gate (SiLU), the second the value.
  """

  hidden_dim: int
  out_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_dim = self.out_dim or x.shape[-1]
    x12 = Dense(2 * self.hidden_dim, dtype=self.dtype, kernel_init=default_kernel_init, name="w12")(
      x
    )
    x1, x2 = jnp.split(x12, 2, axis=-1)
    return Dense(out_dim, dtype=self.dtype, kernel_init=default_kernel_init, name="w3")(
      jax.nn.silu(x1) * x2
    )


@flax.struct.dataclass
class KVCache:
  """Static-shape key/value cache of one attention layer, for token-by-token decoding.

  Keys (RoPE and QK-norm already applied) and values of the positions decoded so far are
  written at `[index, index + n)` by each cached call; the arrays never change shape, so a
  decode step traces once and runs inside `lax.fori_loop` / `lax.scan`.

  Attributes:
    key, value: `[B, L, H, Dh]`, L the maximum sequence length.
    index: int32 scalar, the number of positions written (the next write position).
  """

  key: jax.Array
  value: jax.Array
  index: jax.Array

  @classmethod
  def zeros(
    cls, batch: int, length: int, num_heads: int, head_dim: int, dtype: Dtype = jnp.float32
  ) -> KVCache:
    shape = (batch, length, num_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.key.shape[1]


def _cached_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, *, is_causal: bool
) -> tuple[jax.Array, KVCache]:
  """Writes `k, v: [B, n, H, Dh]` at `cache.index` and attends `q` to every written position.

  With `is_causal`, new token j (absolute position `index + j`) sees positions `<= index + j`;
  otherwise it sees all positions `< index + n`. Unwritten slots are masked out, so the result
  equals full-sequence attention restricted to the same keys.
  """
  n = q.shape[1]
  start = cache.index
  zero = jnp.zeros((), jnp.int32)
  key = jax.lax.dynamic_update_slice(
    cache.key, k.astype(cache.key.dtype), (zero, start, zero, zero)
  )
  value = jax.lax.dynamic_update_slice(
    cache.value, v.astype(cache.value.dtype), (zero, start, zero, zero)
  )
  key_pos = jnp.arange(cache.max_length)[None, :]
  if is_causal:
    visible = key_pos <= start + jnp.arange(n)[:, None]  # [n, L]
  else:
    visible = jnp.broadcast_to(key_pos < start + n, (n, cache.max_length))
  out = dot_product_attention(
    q, key.astype(q.dtype), value.astype(q.dtype), mask=visible[None, None]
  )
  return out, KVCache(key, value, start + n)


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: jax.Array | None = None,
  is_causal: bool = False,
) -> jax.Array:
  """Softmax attention, `q, k, v: [B, T, H, D]` -> `[B, T, H, D]`; the numbers of
  `jax.nn.dot_product_attention` (float32 logits and softmax, scale `D ** -0.5`, a boolean
  `mask` broadcastable to `[B, H, T, S]`, `is_causal`). A query whose mask hides every key
  gets the mean of the values, as there; unlike there, gradient still reaches that query
  (the mask is an additive bias, not a `where`); no model here masks a query from every key.

  Heads-first: q, k and v are moved to `[B, H, T, D]` once, so both products are plain batched
  GEMMs, and masks enter as an additive bias. On XLA's CPU backend this runs the forward 1.7-3.8x
  and forward + backward 1.3-1.7x faster than `jax.nn.dot_product_attention` on the demo's and
  LightningDiT-S's shapes (README, "Speed of the demo's steps"); on TPU both are the same XLA
  einsums. On GPU `jax.nn.dot_product_attention` is kept (it may pick cuDNN's fused kernel).
  """
  if jax.default_backend() == "gpu":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
  head_dim = q.shape[-1]
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(head_dim**-0.5)
  visible = mask
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), bool))
    visible = causal if visible is None else jnp.logical_and(visible, causal)
  if visible is not None:
    # The large finite negative of jax's own implementation: a fully masked row is uniform.
    big_neg = jnp.asarray(jnp.finfo(jnp.float32).min * 0.7, jnp.float32)
    logits = logits + jnp.where(visible, jnp.float32(0), big_neg)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - peak)
  probs = (e / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), 1, 2)


class Attention(nn.Module):
  """Multi-head self-attention with a fused `qkv` projection.

  Options: head_dim independent of the width (the FAE adapter uses 24 x 256 on a 1536 input),
  QK-norm (RMSNorm per head), 2-D RoPE (tables passed at call time), an additive or boolean
  mask, causal masking.

  Decoding: with `cache` (a `KVCache`), `x: [B, n, D]` holds the n NEW tokens, `rope` their
  tables (`[n, Dh // 2]`, absolute positions `cache.index ...`), and the call returns
  `(out, new_cache)`; `mask` must be None (causality comes from `is_causal` and the cache index).
  Without `cache` the call is unchanged and returns `out` alone.
  """

  num_heads: int
  head_dim: int | None = None
  out_dim: int | None = None
  qkv_bias: bool = True
  qk_norm: bool = False
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rope: tuple[jax.Array, jax.Array] | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    cache: KVCache | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    b, n, d = x.shape
    head_dim = self.head_dim or d // self.num_heads
    inner = self.num_heads * head_dim
    qkv = Dense(
      3 * inner,
      use_bias=self.qkv_bias,
      dtype=self.dtype,
      kernel_init=default_kernel_init,
      name="qkv",
    )(x)
    q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.num_heads, head_dim), 3, axis=2)
    if self.qk_norm:
      q = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name="q_norm")(q)
      k = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype, name="k_norm")(k)
    if rope is not None:
      q = apply_rope(q, *rope)
      k = apply_rope(k, *rope)
    if cache is None:
      out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    else:
      if mask is not None:
        raise ValueError("Attention: `mask` is not supported together with a KV `cache`.")
      out, cache = _cached_attention(q, k, v, cache, is_causal=is_causal)
    out = out.reshape(b, n, inner)
    out = Dense(self.out_dim or d, dtype=self.dtype, kernel_init=default_kernel_init, name="proj")(
      out
    )
    return out if cache is None else (out, cache)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Everything that shapes one pre-norm transformer block."""

  width: int
  num_heads: int
  head_dim: int | None = None
  mlp_hidden: int | None = None  # defaults to 4 * width (MLP) or its SwiGLU equivalent
  ffn: str = "mlp"  # 'mlp' | 'swiglu'
  activation: str = "gelu"  # MLP activation
  norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
  norm_eps: float = 1e-6
  layerscale: float | None = None  # LayerScale init value; None = no LayerScale
  qkv_bias: bool = True
  qk_norm: bool = False

  def hidden_dim(self) -> int:
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    if self.ffn == "swiglu":
      return swiglu_hidden_dim(self.width, 4.0)
    return 4 * self.width


def block_config_of(config: Any, **overrides: Any) -> BlockConfig:
  """The `BlockConfig` of a model config with `width`, `num_heads`, `ffn`, `mlp_ratio`, `norm` and
  `norm_eps` fields (DiT, TarFlow, pixel decoder); `overrides` set the other block fields."""
  return BlockConfig(
    width=config.width,
    num_heads=config.num_heads,
    mlp_hidden=ffn_hidden_dim(config.ffn, config.width, config.mlp_ratio),
    ffn=config.ffn,
    norm=config.norm,
    norm_eps=config.norm_eps,
    **overrides,
  )


class Block(nn.Module):
  """Pre-norm transformer block: `x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`.

  With a `KVCache` (see `Attention`), returns `(x, new_cache)` for the new tokens `x`.
  """

  config: BlockConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    rope: tuple[jax.Array, jax.Array] | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    cache: KVCache | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    c = self.config
    if c.ffn not in ("mlp", "swiglu"):
      raise ValueError(f"Unknown ffn {c.ffn!r}; choose 'mlp' or 'swiglu'.")
    h = make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm1")(x)
    h = Attention(
      num_heads=c.num_heads,
      head_dim=c.head_dim,
      qkv_bias=c.qkv_bias,
      qk_norm=c.qk_norm,
      norm_eps=c.norm_eps,
      dtype=self.dtype,
      name="attn",
    )(h, rope=rope, mask=mask, is_causal=is_causal, cache=cache)
    if cache is not None:
      h, cache = h
    if c.layerscale is not None:
      h = LayerScale(c.layerscale, name="ls1")(h)
    x = x + h
    h = make_norm(c.norm, eps=c.norm_eps, dtype=self.dtype, name="norm2")(x)
    if c.ffn == "swiglu":
      h = SwiGLU(c.hidden_dim(), dtype=self.dtype, name="mlp")(h)
    else:
      h = Mlp(c.hidden_dim(), activation=c.activation, dtype=self.dtype, name="mlp")(h)
    if c.layerscale is not None:
      h = LayerScale(c.layerscale, name="ls2")(h)
    return x + h if cache is None else (x + h, cache)
