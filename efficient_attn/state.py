"""The train state: built sharded, saved and restored with orbax, its buffers redrawn.

    shapes, state_sh = init_state(model, tx, mesh, dummy, rng, abstract_only=True)
    mngr = checkpoint_manager(workdir, t)                       # DIR/checkpoints
    state, position = restore_checkpoint(mngr, step, shapes, state_sh)   # onto any mesh
    save_checkpoint(mngr, step, state, position)               # async; the manager's close() waits

The state is {"step", "params", "opt_state"[, "buffers"]}: "buffers" are the model's non-trainable
arrays (the Performer's projections), saved with it and never optimised. A checkpoint also holds the
data position (the index of the next batch), so a resumed run reads what an uninterrupted one does.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from efficient_attn import sharding
from efficient_attn.layers import redraw_buffers


def init_state(model, tx, mesh, dummy, rng, *, abstract_only=False):
  """Builds the sharded train state: eval_shape -> shardings by the rules table -> jit(init).

  abstract_only: return ShapeDtypeStructs instead (a resume restores into them and
  never compiles init, which for XLA's threefry takes longer than the train step).
  """

  def init(rng):
    variables = model.init(rng, dummy)
    params = variables["params"]
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if variables.get("buffers"):  # non-trainable (Performer projections): saved, never optimised
      state["buffers"] = variables["buffers"]
    return state

  abstract = jax.eval_shape(init, rng)  # boxed with logical axis names (nn.Partitioned)
  state_sh = sharding.param_shardings(abstract, mesh)
  if abstract_only:
    return nn.unbox(abstract), state_sh
  state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=state_sh)(rng)
  return state, state_sh


def make_redraw(model, t, state_sh, dummy):
  """Jitted (state, step) -> state with every attention buffer drawn anew (FAVOR+ feature redraw).

  The draw for step s uses fold_in(PRNGKey(train.seed + 1), s), so a resumed run redraws the same
  features as an uninterrupted one. Only the buffers are computed (the forward pass is dead code).
  """

  def redraw(state, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(t.seed + 1), step)
    variables = {"params": state["params"], "buffers": state["buffers"]}
    return {**state, "buffers": redraw_buffers(model, variables, rng, dummy)["buffers"]}

  return jax.jit(redraw, in_shardings=(state_sh, None), out_shardings=state_sh, donate_argnums=0)


def compiled_redraw(model, t, state_sh, dummy, state):
  """`make_redraw` compiled ahead of the loop (its compile time is not training time); None if nothing to redraw."""
  if not t.redraw_every or "buffers" not in state:
    return None
  compiled = make_redraw(model, t, state_sh, dummy).lower(state, jnp.int32(0)).compile()
  return lambda state, step: compiled(state, jnp.int32(step))


def checkpoint_manager(workdir: str, t) -> ocp.CheckpointManager:
  """DIR/checkpoints, keeping train.max_to_keep steps, saving asynchronously."""
  # cleanup_tmp_directories: a save cut short by SIGKILL leaves only `<step>.orbax-checkpoint-tmp-*`.
  options = ocp.CheckpointManagerOptions(max_to_keep=t.max_to_keep, create=True,
                                         enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save_checkpoint(mngr, step: int, state, position: int) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave({"position": position})))


def restore_checkpoint(mngr, step: int, state_like, state_sh):
  """Restores onto `state_sh` (any mesh: orbax reshards), returns (state, data position)."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, state_sh)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                   data=ocp.args.JsonRestore()))
  return out["state"], int(out["data"]["position"])
