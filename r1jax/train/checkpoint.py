"""Orbax checkpoints of the train state together with the data iterator's state.

Saving both in one step directory is what makes resume exact: a killed run
restarts from the last saved step on the very next batch it would have seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from r1jax import storage


class NonFiniteError(RuntimeError):
  """A NaN or inf where training needs finite numbers; the run stops rather than go on."""


@jax.jit
def _finite_leaves(leaves: list) -> list:
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_paths(tree) -> list[str]:
  """Paths of the floating leaves of `tree` holding a NaN or inf."""
  flat = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  ok = jax.device_get(_finite_leaves([x for _, x in flat]))
  return [path for (path, _), good in zip(flat, ok) if not good]


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

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` will write (orbax's interval, first-save and
    preemption rules)."""
    return self._mngr.should_save(step)

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Saves when the interval (or `force`) says so; returns whether it did.

    Raises NonFiniteError rather than write a state holding a NaN or inf: the
    last checkpoint must stay one a resume can train from."""
    if not force and not self.due(step):
      return False
    bad = nonfinite_paths(state)
    if bad:
      more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
      raise NonFiniteError(f"refusing to write checkpoint step {step} to {self.directory}: "
                           f"non-finite values in state{bad[0]}{more}")
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
