"""TarFlow / STARFlow: a transformer autoregressive normalizing flow on latent tokens.

The flow maps a latent `x [B, h, w, c]` to Gaussian noise `z` of the same shape through a stack
of affine autoregressive blocks (Zhai et al. 2024, "Normalizing Flows are Capable Generative
Models"; Gu et al. 2025, STARFlow):

```
x --patchify(p)--> tokens [B, T, d]  (T = (h/p)(w/p), d = p*p*c)
  --shallow_0--> ... --shallow_{n-1}--> --deep--> z tokens --unpatchify--> z [B, h, w, c]
```

One block (tokens `x_0 .. x_{T-1}` in the block's order):

```
inputs  = [class token (deep block only), sos, W_in x_0, ..., W_in x_{T-2}]   [B, P + T, W]
h       = causal transformer(inputs) (layers.Block, 2-D RoPE), final norm
(mu_i, r_i) = W_out h[P + i]            # depends on the class and on x_{<i} only
z_i     = (x_i - mu_i) * exp(-a_i),  a_i = log_scale(r_i),   logdet = -sum_i a_i
```

The input sequence is shifted by one token: position P + i holds `x_{i-1}` (position P holds a
learned start-of-sequence vector `sos`), so the causal mask makes `(mu_i, a_i)` a function of
the tokens before i. Token 0 therefore gets a learned affine map that depends only on the class
(deep block) or is a learned constant (shallow blocks); STARFlow's `sos=1` layout. `W_out` starts
at zero (kernel and bias), so every block, and the whole flow, is the identity at initialisation.

Choices, with the reference they follow:
  * Deep-shallow layout (STARFlow): `num_shallow` blocks of `shallow_depth` layers, then one deep
    block of `deep_depth` layers, in the data -> noise direction; so sampling runs the deep block
    first, from the noise. STARFlow's `Model` puts the deep ("top") block last in `forward` and
    first in `reverse`; its class-conditional ImageNet model `TarFlow_XLv2_1` has layers
    `[2, 2, 2, 2, 2, 18]`, width 2048, head dim 64, patch 1.
  * Token orders: STARFlow's released config (`starflow_3B_t2i_256x256.yaml`) sets
    `seq_order='L2R'`, under which its deep block reads the tokens in raster order and, going
    towards the data, the shallow blocks alternate reversed / raster (the one next to the deep
    block is reversed). We do the same. Alternating lets every token condition on every other
    one somewhere in the stack.
  * Per block (STARFlow's `MetaBlock`): `proj_in`, the layers, a final norm (`use_final_norm`),
    `proj_out` to `(mu, raw log-scale)`. Its class conditioning is a one-hot label through a
    Linear layer, i.e. an embedding table, which is what `class_embed` is.
  * Class conditioning on the deep block only (STARFlow's `cond_top_only`): a class-token prefix
    from a `num_classes + 1` table; row `num_classes` is the null class, used for label dropout
    and guidance; `num_classes = 0` is an unconditional flow (no prefix).
  * Positions: 2-D axial RoPE (`layers.rope_2d_tables`). Sequence position P + i carries the grid
    position of the token it predicts (token i in the block's order), as STARFlow's sos layout
    does; the class token gets the identity rotation.
  * Scale parameterisation (`scale_param`, `soft_clip`): the raw log-scale output r is first
    soft-clipped, `r <- c * tanh(r / c)` (c = `soft_clip`, 0 = off), then
      'softplus' (default, STARFlow `use_softplus`): `sigma = softplus(r + softplus^-1(1))`,
                 `a = log(sigma)`;
      'exp' (TarFlow): `a = r`.
    Why: sampling multiplies by `sigma = exp(a)` token after token and block after block, so
    one large raw output would blow a sample up exponentially under 'exp'; softplus grows only
    linearly in r, `d a / d r = sigmoid(u) / softplus(u) <= 1` keeps the logdet gradient bounded,
    and the tanh clip bounds sigma on both sides (c = 4: sigma in [0.031, 4.55]) so neither the
    forward contraction nor the inverse expansion can run away in low precision. The offset
    makes r = 0 the identity. Unlike STARFlow we clip only the scale, not mu: mu is a location
    in the units of the block's input (intermediate blocks' inputs are not standardised) and
    the affine map is linear in it, so bounding it buys no stability.
  * Precision: compute in `dtype` (default float32; bfloat16 on TPU/GPU), parameters and the
    residual stream float32; the output projection, the affine transform and the logdet run in
    `promote_types(float32, dtype)` (float32, or float64 when `dtype='float64'` for tests).
  * Inverse (`TarFlow.inverse`): per block, token by token inside `nn.while_loop`, either with a
    static-shape KV cache per layer (`layers.KVCache`; the class token is prefilled, then one
    token per step) or by recomputing the full causal pass every step (the reference). Both
    give the same result to rounding.
  * Guidance (STARFlow `MetaBlock.guidance`): the deep block runs the conditional and the
    null-class sequence side by side and combines the two Gaussians `N(mu, sigma^2)` of each
    token as `p_c^s / p_u^(s-1)` (s = guidance scale; STARFlow's `cfg` w is s - 1):
      `r = min(sigma_c / sigma_u, 1)^2`, `k = 1 + w (1 - r)`,
      `mu = ((1 + w) mu_c - w r mu_u) / k`, `sigma = sigma_c / sqrt(k)`.
    The clip keeps the combined precision positive. At s = 1 (w = 0) k = 1 and the result is
    the conditional mu, sigma exactly. Both streams then take the guided token as their next
    input. Shallow blocks are unconditional, so guidance touches only the deep block.
  * Temperature: `inverse` maps `temperature * z`.

The config (`TarFlowConfig`) is in `fae_jax.models.tarflow_config`. Parameter count and FLOPs:
README.md, "Parameter counts".
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fae_jax import sharding
from fae_jax.models import layers
from fae_jax.models.tarflow_config import TarFlowConfig

Dtype = Any

# softplus^-1(1) = log(e - 1): makes a zero raw output the identity under 'softplus'.
_INV_SOFTPLUS_1 = math.log(math.e - 1.0)


def log_scale_from_raw(raw: jax.Array, scale_param: str, soft_clip: float) -> jax.Array:
  """Raw network output -> log-scale `a` (`z = (x - mu) * exp(-a)`); dtype of `raw`."""
  if soft_clip > 0:
    raw = soft_clip * jnp.tanh(raw / soft_clip)
  if scale_param == "exp":
    return raw
  u = raw + _INV_SOFTPLUS_1
  # log(softplus(u)); for very negative u softplus(u) ~ exp(u) underflows, while log -> u.
  return jnp.where(u < -30.0, u, jnp.log(jax.nn.softplus(jnp.maximum(u, -30.0))))


def guide_affine(
  mu_c: jax.Array, a_c: jax.Array, mu_u: jax.Array, a_u: jax.Array, scale: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
  """STARFlow's flow guidance: the Gaussian `N(mu_c, e^{2a_c})^s / N(mu_u, e^{2a_u})^(s-1)`.

  Returns the guided `(mu, a)`; at `scale == 1` exactly `(mu_c, a_c)`.
  """
  w = jnp.asarray(scale, jnp.result_type(mu_c)) - 1.0
  ratio = jnp.exp(2.0 * jnp.minimum(a_c - a_u, 0.0))  # (sigma_c / sigma_u)^2 clipped to <= 1
  k = 1.0 + w * (1.0 - ratio)
  mu = ((1.0 + w) * mu_c - (w * ratio) * mu_u) / k
  return mu, a_c - 0.5 * jnp.log(k)


def _is_unit_guidance(guidance: Any) -> bool:
  """A Python scale of 1 (or None) needs no unconditional pass."""
  return guidance is None or (isinstance(guidance, int | float) and float(guidance) == 1.0)


def _block_with_mask(
  block: layers.Block, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
) -> jax.Array:
  return block(h, rope=(cos, sin), mask=mask)


# Rematerialised full-sequence layer for training (`TarFlowConfig.remat`); the same parameters as a
# plain call, and the cached decoding path calls the layer directly.
_remat_block = nn.remat(_block_with_mask)


# ----------------------------------------------------------------------------------------------
# One affine autoregressive flow block.
# ----------------------------------------------------------------------------------------------


class FlowBlock(nn.Module):
  """One TarFlow block on tokens `[B, T, d]` (natural raster order in and out).

  `reversed_order` runs the autoregression over the flipped token sequence; `conditional`
  prepends the class token.
  """

  config: TarFlowConfig
  depth: int
  reversed_order: bool = False
  conditional: bool = False

  def setup(self):
    c = self.config
    dt = c.compute_dtype
    self.proj_in = layers.Dense(c.width, dtype=dt, kernel_init=layers.default_kernel_init)
    self.sos = self.param("sos", nn.initializers.normal(stddev=0.02), (c.width,))
    if self.conditional:
      self.class_embed = nn.Embed(
        c.num_classes + 1, c.width, embedding_init=nn.initializers.normal(stddev=0.02)
      )
    self.blocks = [layers.Block(c.block_config(), dtype=dt) for _ in range(self.depth)]
    self.norm = layers.make_norm(c.norm, eps=c.norm_eps, dtype=dt)
    # Zero init (kernel and bias): mu = 0, a = 0, so the block starts as the identity.
    self.proj_out = layers.Dense(
      2 * c.token_dim,
      dtype=c.out_dtype,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
    )

  # --- pieces --------------------------------------------------------------------------------

  @property
  def num_prefix(self) -> int:
    return self.config.num_prefix if self.conditional else 0

  def order(self, x: jax.Array) -> jax.Array:
    """Natural <-> block token order (a flip is its own inverse). `x: [B, T, ...]`."""
    return jnp.flip(x, axis=1) if self.reversed_order else x

  def rope_tables(self) -> tuple[jax.Array, jax.Array]:
    """`(cos, sin)`, each `[P + T, head_dim / 2]`: prefix identity, then sequence position P + i
    gets the grid position of token i in the block's order."""
    c = self.config
    cos, sin = layers.rope_2d_tables(
      (c.grid_size, c.grid_size), c.head_dim, theta=c.rope_theta, num_prefix=self.num_prefix
    )
    if self.reversed_order:
      p = self.num_prefix
      cos = np.concatenate([cos[:p], cos[p:][::-1]])
      sin = np.concatenate([sin[:p], sin[p:][::-1]])
    return jnp.asarray(cos), jnp.asarray(sin)

  def class_tokens(self, y: jax.Array | None, batch: int) -> jax.Array:
    """`[B, P, W]` prefix in the residual dtype (empty if unconditional); y None = null class."""
    if not self.conditional:
      return jnp.zeros((batch, 0, self.config.width), self.residual_dtype)
    if y is None:
      y = jnp.full((batch,), self.config.null_class, jnp.int32)
    return self.class_embed(y.astype(jnp.int32))[:, None, :].astype(self.residual_dtype)

  @property
  def residual_dtype(self) -> Dtype:
    return self.config.out_dtype

  def embed_tokens(self, x: jax.Array) -> jax.Array:
    """`[B, n, d] -> [B, n, W]` in the residual dtype."""
    return self.proj_in(x).astype(self.residual_dtype)

  def head(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Final norm + output projection: `[B, n, W] -> (mu, a)`, each `[B, n, d]`, out dtype."""
    c = self.config
    out = self.proj_out(self.norm(h).astype(c.out_dtype))
    mu, raw = jnp.split(out, 2, axis=-1)
    return mu, log_scale_from_raw(raw, c.scale_param, c.soft_clip)

  # --- full causal pass ----------------------------------------------------------------------

  def affine_params(self, xs: jax.Array, y: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """`(mu, a)` for every token, `[B, T, d]` each; `xs: [B, T, d]` in the block's order."""
    c = self.config
    b, t = xs.shape[:2]
    p = self.num_prefix
    sos = jnp.broadcast_to(self.sos.astype(self.residual_dtype), (b, 1, c.width))
    h = jnp.concatenate([self.class_tokens(y, b), sos, self.embed_tokens(xs[:, : t - 1])], axis=1)
    rope = self.rope_tables()
    if c.remat:
      # Lifted remat traces every argument, so causality goes in as an array mask.
      causal = jnp.tril(jnp.ones((p + t, p + t), bool))[None, None]
      for blk in self.blocks:
        h = sharding.constrain_batch(_remat_block(blk, h, *rope, causal))
    else:
      for blk in self.blocks:
        h = sharding.constrain_batch(blk(h, rope=rope, is_causal=True))
    return self.head(h[:, p:])

  def __call__(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Forward (data -> noise): `x: [B, T, d]` -> `(z [B, T, d], logdet [B])`, out dtype."""
    x = x.astype(self.config.out_dtype)
    xs = self.order(x)
    mu, a = self.affine_params(xs, y)
    zs = (xs - mu) * jnp.exp(-a)
    return self.order(zs), -jnp.sum(a, axis=(1, 2))

  # --- cached decoding -----------------------------------------------------------------------

  def init_caches(self, batch: int) -> list[layers.KVCache]:
    """One empty `KVCache` per layer, `P + T` positions (the last token is never an input)."""
    c = self.config
    length = self.num_prefix + c.num_tokens
    return [
      layers.KVCache.zeros(batch, length, c.num_heads, c.head_dim, c.compute_dtype)
      for _ in range(self.depth)
    ]

  def _trunk_cached(
    self, h: jax.Array, rope: tuple[jax.Array, jax.Array], caches: list[layers.KVCache]
  ) -> tuple[jax.Array, list[layers.KVCache]]:
    new_caches = []
    for blk, cache in zip(self.blocks, caches, strict=True):
      h, cache = blk(h, rope=rope, is_causal=True, cache=cache)
      new_caches.append(cache)
    return h, new_caches

  def prefill(self, y: jax.Array | None, caches: list[layers.KVCache]) -> list[layers.KVCache]:
    """Writes the class-token prefix into the caches (no-op for unconditional blocks)."""
    p = self.num_prefix
    if p == 0:
      return caches
    cos, sin = self.rope_tables()
    h = self.class_tokens(y, caches[0].key.shape[0])
    _, caches = self._trunk_cached(h, (cos[:p], sin[:p]), caches)
    return caches

  def decode_step(
    self, prev: jax.Array, t: jax.Array, caches: list[layers.KVCache]
  ) -> tuple[jax.Array, jax.Array, list[layers.KVCache]]:
    """`(mu_t, a_t)` `[B, d]` of token t (block order) from its predecessor `prev: [B, 1, d]`
    (ignored at t = 0, where the input is `sos`); appends one position to the caches."""
    b = prev.shape[0]
    h = jnp.where(
      t == 0,
      jnp.broadcast_to(self.sos.astype(self.residual_dtype), (b, 1, self.config.width)),
      self.embed_tokens(prev.astype(self.config.out_dtype)),
    )
    cos, sin = self.rope_tables()
    pos = self.num_prefix + t
    rope = (
      jax.lax.dynamic_slice_in_dim(cos, pos, 1, axis=0),
      jax.lax.dynamic_slice_in_dim(sin, pos, 1, axis=0),
    )
    h, caches = self._trunk_cached(h, rope, caches)
    mu, a = self.head(h)
    return mu[:, 0], a[:, 0], caches

  # --- inverse -------------------------------------------------------------------------------

  def inverse(
    self, z: jax.Array, y: jax.Array | None = None, *, cache: bool = True, guidance: Any = None
  ) -> jax.Array:
    """Inverse (noise -> data) token by token: `z: [B, T, d] -> x [B, T, d]`, out dtype.

    Args:
      z: block output in natural order.
      y: `[B]` labels (conditional block); None = null class.
      cache: decode with per-layer KV caches (True) or recompute the full causal pass for every
        token (False; the O(T^2)-passes reference).
      guidance: scale s (float or scalar array); None or the Python number 1 = conditional
        only, no extra pass. Only used by a conditional block.
    """
    c = self.config
    zs = self.order(z.astype(c.out_dtype))
    b, t_len, _ = zs.shape
    guided = self.conditional and not _is_unit_guidance(guidance)
    if self.conditional and y is None:
      y = jnp.full((b,), c.null_class, jnp.int32)
    y_run = y
    if guided:
      y_run = jnp.concatenate([y, jnp.full_like(y, c.null_class)])

    def combine(mu, a):
      # [nb, d] or [nb, T, d] -> [B, ...]; guided streams are (conditional, unconditional).
      if not guided:
        return mu, a
      return guide_affine(mu[:b], a[:b], mu[b:], a[b:], guidance)

    def streams(x):
      return jnp.concatenate([x, x]) if guided else x

    def write(x, t, mu, a):
      z_t = jax.lax.dynamic_slice_in_dim(zs, t, 1, axis=1)[:, 0]
      x_t = z_t * jnp.exp(a) + mu
      return jax.lax.dynamic_update_slice_in_dim(x, x_t[:, None].astype(x.dtype), t, axis=1)

    def cond_fn(mdl, carry):
      return carry[0] < t_len

    x0 = jnp.zeros_like(zs)
    if cache:
      caches = self.prefill(y_run, self.init_caches(y_run.shape[0] if guided else b))

      def body(mdl, carry):
        t, x, caches = carry
        prev = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(t - 1, 0), 1, axis=1)
        mu, a, caches = mdl.decode_step(streams(prev), t, caches)
        mu, a = combine(mu, a)
        return t + 1, write(x, t, mu, a), caches

      carry = (jnp.zeros((), jnp.int32), x0, caches)
    else:

      def body(mdl, carry):
        t, x = carry
        mu, a = mdl.affine_params(streams(x), y_run)
        mu, a = combine(mu, a)
        mu_t = jax.lax.dynamic_slice_in_dim(mu, t, 1, axis=1)[:, 0]
        a_t = jax.lax.dynamic_slice_in_dim(a, t, 1, axis=1)[:, 0]
        return t + 1, write(x, t, mu_t, a_t)

      carry = (jnp.zeros((), jnp.int32), x0)
    carry = nn.while_loop(cond_fn, body, self, carry)
    return self.order(carry[1])


# ----------------------------------------------------------------------------------------------
# The flow.
# ----------------------------------------------------------------------------------------------


class TarFlow(nn.Module):
  """The deep-shallow TarFlow. Parameters live under `shallow_{i}/` and `deep/`.

  `apply(params, x, y)` is `forward`; `apply(..., method=TarFlow.inverse)` samples;
  `apply(..., method=TarFlow.log_prob)` is the exact log-likelihood.
  """

  config: TarFlowConfig

  def setup(self):
    specs = self.config.flow_blocks()
    self.shallow = [
      FlowBlock(self.config, depth=d, reversed_order=r, conditional=cond)
      for _, d, r, cond in specs[:-1]
    ]
    _, d, r, cond = specs[-1]
    self.deep = FlowBlock(self.config, depth=d, reversed_order=r, conditional=cond)

  def _check(self, x: jax.Array, what: str) -> None:
    c = self.config
    expected = (c.input_size, c.input_size, c.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(
        f"TarFlow.{what} expects latents [B, {', '.join(map(str, expected))}], "
        f"got {tuple(x.shape)}; check TarFlowConfig.input_size/in_channels."
      )

  def flow_blocks(self) -> list[FlowBlock]:
    """Blocks in the data -> noise order."""
    return [*self.shallow, self.deep]

  def forward(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Data -> noise: `x [B, h, w, c]`, labels `y [B]` (None = null class) ->
    `(z [B, h, w, c], logdet [B])`, both in the out dtype (float32 unless float64)."""
    self._check(x, "forward")
    c = self.config
    h = layers.patchify(x.astype(c.out_dtype), c.patch_size)
    logdet = jnp.zeros((x.shape[0],), c.out_dtype)
    for blk in self.shallow:
      h, ld = blk(h)
      logdet = logdet + ld
    h, ld = self.deep(h, y)
    return layers.unpatchify(h, c.patch_size, c.grid_size), logdet + ld

  def __call__(self, x: jax.Array, y: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    return self.forward(x, y)

  def log_prob(self, x: jax.Array, y: jax.Array | None = None) -> jax.Array:
    """`log p(x | y)` in nats per example, `[B]`: `-0.5 |z|^2 - 0.5 D log(2 pi) + logdet`."""
    z, logdet = self.forward(x, y)
    d = self.config.num_dims
    prior = -0.5 * jnp.sum(jnp.square(z), axis=(1, 2, 3)) - 0.5 * d * math.log(2.0 * math.pi)
    return prior + logdet

  def inverse(
    self,
    z: jax.Array,
    y: jax.Array | None = None,
    *,
    cache: bool = True,
    guidance: Any = None,
    temperature: float | jax.Array = 1.0,
  ) -> jax.Array:
    """Noise -> data: `z [B, h, w, c] -> x [B, h, w, c]` (out dtype).

    The deep block runs first (with guidance `guidance`, see `FlowBlock.inverse`), then the
    shallow blocks from the noise side to the data side. `temperature` scales z.
    """
    self._check(z, "inverse")
    c = self.config
    h = layers.patchify(z.astype(c.out_dtype) * temperature, c.patch_size)
    h = self.deep.inverse(h, y, cache=cache, guidance=guidance)
    for blk in reversed(self.shallow):
      h = blk.inverse(h, cache=cache)
    return layers.unpatchify(h, c.patch_size, c.grid_size)


# ----------------------------------------------------------------------------------------------
# FLOPs and parameters.
# ----------------------------------------------------------------------------------------------


def flow_flops_per_example(config: TarFlowConfig, *, training: bool = False) -> float:
  """Analytic forward FLOPs of one example (2 x MACs of every matmul); `training` = 3x."""
  c = config
  t, d, w = c.num_tokens, c.token_dim, c.width
  block = c.block_config()
  hidden = block.hidden_dim()
  ffn_macs_per_token = (3 if c.ffn == "swiglu" else 2) * w * hidden
  total = 0.0
  for _, depth, _, conditional in c.flow_blocks():
    s = t + (c.num_prefix if conditional else 0)
    per_layer = 2 * s * (3 * w * w + w * w + ffn_macs_per_token) + 2 * 2 * s * s * w
    total += depth * per_layer
    total += 2 * (t - 1) * d * w  # proj_in (the last token is never an input)
    total += 2 * t * w * 2 * d  # proj_out
  return 3.0 * total if training else total


def count_params(config: TarFlowConfig) -> int:
  """Number of parameters, from `jax.eval_shape` of the init (nothing is allocated)."""
  model = TarFlow(config)
  x = jax.ShapeDtypeStruct(
    (1, config.input_size, config.input_size, config.in_channels), jnp.float32
  )
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, y)
  return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
