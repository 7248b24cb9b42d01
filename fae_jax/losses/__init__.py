"""Training objectives. Import the submodules directly (`from fae_jax.losses import fae`)."""
