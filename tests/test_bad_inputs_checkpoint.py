"""A checkpoint of another model config in the workdir (issue 15): the train loop stops naming
each differing parameter (path, saved shape vs expected shape) and the fix, instead of an Orbax
traceback, and the checkpoint stays intact (the original config still resumes from it)."""

import flax.linen as nn
import jax.numpy as jnp
import pytest
import train_loop_toy as toy

from fae_jax.train import loop


class WiderMLP(nn.Module):
  """The toy MLP with a hidden width of 48 instead of 32: every kernel but none of the names
  differ."""

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(48)(x))
    return nn.Dense(toy.OUT_DIM)(x)


def _train(tmp_path, num_steps, init_params_fn):
  return loop.train(
    workdir=tmp_path,
    stage=toy.STAGE,
    config=toy.make_config(num_steps),
    mesh=toy.make_mesh(),
    init_params_fn=init_params_fn,
    loss_fn=toy.loss_fn,
    data_iter_fn=toy.make_data_iter_fn(),
  )


def test_checkpoint_of_another_model_names_the_parameters_and_the_fix(tmp_path):
  assert int(_train(tmp_path, 3, toy.init_params).step) == 3
  checkpoints = tmp_path / toy.STAGE / "checkpoints"
  before = sorted(p.name for p in checkpoints.iterdir())

  def wider(rng):
    return WiderMLP().init(rng, jnp.zeros((1, toy.IN_DIM)))

  with pytest.raises(ValueError) as e:
    _train(tmp_path, 6, wider)
  message = str(e.value)
  assert f"Checkpoint {checkpoints / '3'} does not match" in message
  assert (
    "params.params.Dense_0.kernel: checkpoint has shape (8, 32), the model expects (8, 48)"
    in (message)
  )
  assert "opt_state" in message  # the optimizer moments are named too
  assert "fresh --workdir" in message and "--redo=<this stage>" in message
  assert sorted(p.name for p in checkpoints.iterdir()) == before

  # The checkpoint is intact: the original model resumes from it.
  assert int(_train(tmp_path, 6, toy.init_params).step) == 6
