"""Orbax checkpoints of the train state together with the data iterator's state.

Saving both in one step directory is what makes resume exact: a killed run
restarts from the last saved step on the very next batch it would have seen.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from r1jax import storage


class Checkpointer:
  def __init__(self, directory: str, *, every: int, keep: int = 2):
    self.directory = str(storage.path(directory))
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=max(every, 1), max_to_keep=keep,
                                             create=True))

  @property
  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, abstract_state, step: int | None = None):
    """(state placed like `abstract_state`'s shardings, data iterator state)."""
    step = self.latest_step if step is None else step
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out.state, out.data

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a concrete tree, for restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
