"""Orbax checkpoints of a training run: save every N steps (asynchronously), keep the last K,
resume the latest complete one.

A checkpoint is `checkpoints/<step>/` with two items: `state` (params, EMA params, optimizer
state, step) and `meta` (JSON: the UNet config and what the data order depends on). Orbax writes
into a temporary directory and renames it only once every file is complete, so a run killed in
the middle of a save leaves no checkpoint that `latest` could pick; the leftover temporary
directory is removed the next time the manager opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | Path, max_to_keep: int | None = None, asynchronous: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous,
                                               cleanup_tmp_directories=not read_only, read_only=read_only,
                                               create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving (returns before the files are written when asynchronous)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The saved state, laid out like `abstract_state` (shapes, dtypes and shardings); with
        None, as nested dicts on the default device."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
