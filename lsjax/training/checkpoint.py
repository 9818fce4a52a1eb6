"""Orbax checkpoints of a training run: the train state pytree plus a JSON record.

Layout: ``<run_dir>/checkpoints/<step>/{state,meta}``. The manager keeps the
``keep`` latest steps and the ``keep_best`` best by the validation metric, saves
asynchronously, and restores onto whatever shardings the caller's abstract state
carries (so a checkpoint written under one mesh restores under another).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


class Checkpointer:
    """Keeps N latest + M best checkpoints of ``(state, meta)``.

    Args:
      directory: where the step folders go (created).
      keep: latest checkpoints kept.
      keep_best: best checkpoints kept (by ``meta["metrics"][best_metric]``).
      best_metric: metric name; ``best_mode`` ``"max"`` (e.g. BLEU) or ``"min"`` (loss).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str = "bleu", best_mode: str = "max"):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=best_mode == "min", n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(Path(directory).resolve(), options=options,
                                             item_names=("state", "meta"))
        self._closed = False

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None,
             *, force: bool = False) -> bool:
        """Starts an async save of ``state`` (any pytree of arrays) and ``meta`` (JSON-able);
        ``metrics`` (e.g. validation BLEU/loss) are stored in ``meta["metrics"]``.

        A step that is already saved is left as it is (e.g. a stop request on a checkpoint
        step); returns whether a save was started.
        """
        self.manager.wait_until_finished()  # orbax waits here anyway; then all_steps() is final
        if step in self.manager.all_steps():
            return False
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "metrics": metrics})),
            metrics=metrics or None, force=force)

    def _meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None if no kept step has it)."""
        scored = [(m[self.best_metric], s) for s in self.manager.all_steps()
                  if self.best_metric in (m := self._meta(s).get("metrics", {}))]
        if not scored:
            return None
        return (max(scored) if self.best_mode == "max" else min(scored))[1]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state, meta)`` at ``step`` (default: latest) onto ``abstract_state``'s
        shapes, dtypes and shardings (leaves: arrays or ``jax.ShapeDtypeStruct``)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager (idempotent; queries still work)."""
        if not self._closed:
            self._closed = True
            self.manager.wait_until_finished()
            self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on errors: saves already started complete, none is left half-written


def read_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """The JSON record of a checkpoint (latest if ``step`` is None) without loading arrays."""
    manager = ocp.CheckpointManager(Path(directory).resolve(), item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    manager.close()
    return step, meta
