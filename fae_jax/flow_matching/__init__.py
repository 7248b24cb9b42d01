"""Flow matching on the linear path, network-agnostic, in three modules that do not know each
other's internals (the SiT `transport/` split):

  * `path`: the interpolant `x_t = (1-t) x + t eps` (t = 1 is noise), its velocity target, the
    time shift and the training-time distributions and sampling grid;
  * `objective`: the training loss of any `velocity_fn(x_t, t, y) -> v`;
  * `sampler`: Euler / Heun ODE and Euler-Maruyama SDE integration from noise to data;
  * `guidance`: classifier-free guidance with a banded schedule over t;
  * `dit_sampler`: the trained DiT bound to the sampler, jitted and batch-sharded (evaluation).

Import the submodules directly (`from fae_jax.flow_matching import sampler`).
"""
