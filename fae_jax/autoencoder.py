"""`image -> latents -> image` with a trained run: the inference API on top of the exports.

```python
from fae_jax.autoencoder import Autoencoder

ae = Autoencoder.load("runs/demo")           # encoder/, fae/export/, pixel/export/
z = ae.encode(images)                         # uint8 [B, H, W, 3] -> float32 [B, h, w, c]
x = ae.decode(z)                              # -> uint8 [B, H, W, 3] at the data resolution
x = ae.reconstruct(images)                    # decode(encode(images))
```

* `encode` returns the posterior MEAN of the FAE (the deterministic latent); generators are
  trained on normalised latents, so un-normalise their samples before `decode`.
* `decode` runs the FAE's feature decoder, the pixel decoder, resizes to the data resolution
  recorded in the export (e.g. 32 px decoder output -> 28 px Fashion-MNIST) and quantises like a
  saved image. It is the exact computation of the `pixel` stage's full-path evaluation (the same
  jitted functions, `fae_jax.inference.make_inference_fns`).
* Every weight is a jit argument; the first call per batch shape compiles.
* Results are `jax.Array`s on the default device (`np.asarray` them for the host).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from fae_jax import artifacts, encoder_checkpoint, inference
from fae_jax.models.encoder import EncoderSpec


class Autoencoder:
  """Frozen encoder + FAE + pixel decoder, with their weights.

  Build it with `Autoencoder.load(workdir)`; the constructor takes already loaded parts.
  """

  def __init__(
    self,
    *,
    encoder_params: Any,
    spec: EncoderSpec,
    fae_params: Any,
    fae_config,
    decoder_params: Any,
    decoder_config,
    image_size: tuple[int, int],
    dtypes: dict[str, str] | None = None,
  ):
    dtypes = dtypes or {}
    self.spec = spec
    self.fae_config = fae_config
    self.decoder_config = decoder_config
    self.image_size = tuple(int(s) for s in image_size)
    self._params = jax.device_put(
      {"encoder": encoder_params, "fae": fae_params, "decoder": decoder_params}
    )
    self._fns = inference.make_inference_fns(
      spec,
      fae_config,
      decoder_config,
      self.image_size,
      encoder_dtype=jnp.dtype(dtypes.get("encoder", "float32")),
      fae_dtype=jnp.dtype(dtypes.get("fae", "float32")),
      decoder_dtype=jnp.dtype(dtypes.get("decoder", "float32")),
    )

  @classmethod
  def load(
    cls,
    workdir: str | os.PathLike,
    *,
    encoder_dir: str | os.PathLike | None = None,
    fae_dir: str | os.PathLike | None = None,
    pixel_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
  ) -> Autoencoder:
    """Loads a run's exports.

    Args:
      workdir: the run's `--workdir`.
      encoder_dir: the converted encoder (default `<workdir>/encoder`; pass the upstream
        workdir's `encoder/` for runs made with `config.upstream_workdir`).
      fae_dir: default `<workdir>/fae/export`.
      pixel_dir: default `<workdir>/pixel/export` (`pixel/export_noisy` is the decoder before
        fine-tuning).
      dtype: compute dtype of all three networks, e.g. 'float32'; default: those of the run.

    Raises:
      FileNotFoundError: an export is missing (names the stage that writes it).
      ValueError: the parts were trained on different encoders.
    """
    workdir = epath.Path(workdir)
    encoder_dir = epath.Path(encoder_dir) if encoder_dir else artifacts.encoder_dir(workdir)
    fae_dir = epath.Path(fae_dir) if fae_dir else artifacts.export_dir(workdir, "fae")
    pixel_dir = epath.Path(pixel_dir) if pixel_dir else artifacts.export_dir(workdir, "pixel")
    decoder_params, decoder_config, meta = artifacts.load_export("pixel", pixel_dir)
    fae_params, fae_config, fae_meta = artifacts.load_export("fae", fae_dir)
    if not encoder_checkpoint.is_saved(encoder_dir):
      raise FileNotFoundError(
        f"No converted encoder at {encoder_dir}: run the `convert` stage, or pass "
        "encoder_dir=<upstream workdir>/encoder for runs with config.upstream_workdir."
      )
    encoder_params, backbone, encoder_meta = encoder_checkpoint.load_encoder(encoder_dir)
    wanted = meta["encoder"]["fingerprint"]
    for what, have in (
      (str(encoder_dir), encoder_meta["fingerprint"]),
      (str(fae_dir), fae_meta.get("encoder_fingerprint")),
    ):
      if have != wanted:
        raise ValueError(
          f"{what} belongs to encoder {have}, but the pixel decoder {pixel_dir} was trained on "
          f"features of encoder {wanted}; load the parts of one run."
        )
    tuned_on = meta.get("fae", {}).get("step")
    if tuned_on is not None and tuned_on != fae_meta.get("step"):
      logging.warning(
        "The pixel decoder was fine-tuned on the FAE export of step %s, %s is step %s.",
        tuned_on,
        fae_dir,
        fae_meta.get("step"),
      )
    spec = EncoderSpec(
      backbone=backbone,
      image_size=int(meta["encoder"]["image_size"]),
      features=meta["encoder"]["features"],
    )
    dtypes = dict(meta.get("dtypes", {}))
    if dtype is not None:
      dtypes = {k: dtype for k in ("encoder", "fae", "decoder")}
    return cls(
      encoder_params=encoder_params,
      spec=spec,
      fae_params=fae_params,
      fae_config=fae_config,
      decoder_params=decoder_params,
      decoder_config=decoder_config,
      image_size=tuple(meta["image_size"]),
      dtypes=dtypes,
    )

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """`(h, w, c)` of one latent."""
    return (*self.fae_config.grid, self.fae_config.latent_dim)

  def _check_images(self, images: Any) -> jax.Array:
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != jnp.uint8:
      raise ValueError(
        f"Autoencoder expects uint8 images [B, H, W, 3], got {x.dtype} {tuple(x.shape)} "
        "(grayscale: repeat to 3 channels)."
      )
    return x

  def features(self, images: Any) -> jax.Array:
    """uint8 `[B, H, W, 3]` -> frozen-encoder features `[B, N, D]` float32."""
    return self._fns.features(self._params["encoder"], self._check_images(images))

  def encode(self, images: Any) -> jax.Array:
    """uint8 `[B, H, W, 3]` -> latents `[B, h, w, c]` float32 (posterior mean)."""
    return self._fns.encode(self._params["fae"], self.features(images))

  def decode(self, latents: Any) -> jax.Array:
    """Latents `[B, h, w, c]` -> uint8 images `[B, H, W, 3]` at the data resolution."""
    z = jnp.asarray(latents, jnp.float32)
    if z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
      h, w, c = self.latent_shape
      raise ValueError(f"Autoencoder.decode expects latents [B, {h}, {w}, {c}], got {z.shape}.")
    return self._fns.decode(self._params["fae"], self._params["decoder"], z)

  def encode_features(self, features: Any) -> jax.Array:
    """Frozen-encoder features `[B, N, D]` -> latents `[B, h, w, c]` (posterior mean)."""
    return self._fns.encode(self._params["fae"], jnp.asarray(features, jnp.float32))

  def decode_features(self, features: Any, decoder_params: Any = None) -> jax.Array:
    """The pixel decoder on features `[B, N, D]` (no FAE) -> uint8 `[B, H, W, 3]`.

    `decoder_params`: weights of the same architecture to use instead of this decoder's, e.g.
    the phase-`noisy` export (`pixel/export_noisy`): the noisy-feature path of the `pixel`
    stage's evaluation (that decoder on clean encoder features).
    """
    params = self._params["decoder"] if decoder_params is None else decoder_params
    return self._fns.decode_features(params, jnp.asarray(features, jnp.float32))

  def reconstruct(self, images: Any) -> jax.Array:
    """`decode(encode(images))`: uint8 `[B, H, W, 3]`."""
    return self.decode(self.encode(images))

  def __repr__(self) -> str:
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self._params))
    return (
      f"Autoencoder(image {self.image_size} -> latent {self.latent_shape} -> image, "
      f"encoder {self.spec.image_size}px/{self.spec.features}, {n / 1e6:.1f}M params)"
    )
