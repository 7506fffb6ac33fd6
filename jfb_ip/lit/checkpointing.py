"""Checkpoints that survive a kill: atomic writes, an on-exception checkpoint that never replaces an earlier one, and
the run state Lightning does not save itself (global RNG streams), in the forms ``torch.load(weights_only=True)``
reads back."""
from __future__ import annotations

import inspect
import logging
import os
import random
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

# ModelCheckpoint warns, under manual optimization, that a periodic checkpoint holds the weights after the step: that
# is the state a resumed run continues from (global_step counts that step), so the warning is silenced
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with an atomic write: the checkpoint goes to a hidden temporary file in the
    same directory, is flushed to disk, then renamed over ``path`` (``os.replace`` is atomic on POSIX). A process
    killed while writing leaves the previous ``last.ckpt`` in place, never a truncated one (Lightning's own
    ``_atomic_save`` serialises to memory first but then truncates and rewrites the target file)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class KeepingOnExceptionCheckpoint(Checkpoint):
    """Saves the training state when an exception (a crash, Ctrl-C, SIGTERM) stops ``fit``, only at a step boundary,
    and never overwrites an earlier one.

    A checkpoint is only ever written between two training steps: a state taken inside one (the batch drawn, its
    random stream and the spectral-norm power iterations advanced, half the parameters updated) would not resume
    where an uninterrupted run goes on. So during ``fit`` the first Ctrl-C (SIGINT) is deferred: the step in flight
    finishes, then training stops with ``KeyboardInterrupt`` and this callback writes the state (it runs after the
    other callbacks' ``on_train_batch_end``: Lightning orders checkpoint callbacks last). A second Ctrl-C stops at
    once, inside the step, and nothing is written; nor for an exception raised inside a step (resume from the
    periodic ``last.ckpt``). SIGTERM is Lightning's: it stops at the end of a step (``SIGTERMException``).

    Lightning's ``OnExceptionCheckpoint`` writes ``<dirpath>/on_exception.ckpt`` over whatever is there, deletes it
    at teardown, and makes a later ``fit`` without ``ckpt_path`` resume the newest checkpoint of the directory on its
    own. Here an existing file is kept and the new state goes to ``on_exception-v1.ckpt``, ``on_exception-v2.ckpt``,
    ...; the path written is logged and kept in :attr:`saved_path`; resuming is only ever ``ckpt_path=``."""

    def __init__(self, dirpath, filename: str = "on_exception") -> None:
        if not filename:
            raise ValueError("KeepingOnExceptionCheckpoint: the filename cannot be empty")
        super().__init__()
        self.dirpath, self.filename = str(dirpath), filename
        self.saved_path: str | None = None
        self._boundary: tuple[int, int] | None = None  # (batches started, module batches made) at the last boundary
        self._stop_requested = False
        self._stop_at_boundary = False  # set when this callback raises KeyboardInterrupt between two steps
        self._previous_sigint: Any = None

    def _free_path(self) -> str:
        path, n = os.path.join(self.dirpath, f"{self.filename}.ckpt"), 0
        while os.path.exists(path):
            n += 1
            path = os.path.join(self.dirpath, f"{self.filename}-v{n}.ckpt")
        return path

    @staticmethod
    def _position(trainer) -> tuple[int, int]:
        """What moves as soon as a step begins: Lightning's count of batches started (``increment_ready``, after
        the batch is transferred) and the module's count of training measurements made (in the transfer)."""
        ready = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        return ready, int(getattr(trainer.lightning_module, "_train_batches", 0))

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:  # the second Ctrl-C: stop now, inside the step, without a checkpoint
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: training stops at the end of this step and writes a checkpoint that resumes exactly "
                    "(Ctrl-C again stops at once, without a checkpoint)")

    def on_train_start(self, trainer, pl_module) -> None:
        self._boundary, self._stop_requested, self._stop_at_boundary = self._position(trainer), False, False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_batch_end(self, trainer, *_: Any, **__: Any) -> None:
        self._boundary = self._position(trainer)
        if self._stop_requested:
            self._stop_at_boundary = True
            raise KeyboardInterrupt

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_sigint()
        if self._stop_requested:  # Ctrl-C during the last step or the last validation: training is complete
            self._boundary, self._stop_at_boundary = self._position(trainer), True
            raise KeyboardInterrupt
        self._boundary = None  # fit is over: an exception in test writes nothing

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_sigint()
        if self._boundary is None:  # not training (validate, test) or stopped before the first step began
            return
        boundary, self._boundary = self._boundary, None
        if not self._stop_at_boundary and self._position(trainer) != boundary:
            log.warning("training stopped inside step %d by %s: no checkpoint written (a state taken inside a step "
                        "would not resume exactly); resume from the last periodic checkpoint in %s",
                        trainer.global_step + 1, type(exception).__name__, self.dirpath)
            return
        path = self._free_path()
        trainer.save_checkpoint(path, weights_only=False)  # the full state: resumable
        self.saved_path = path
        log.warning("training stopped after step %d by %s; its state is in %s (resume: ckpt_path=%s)",
                    trainer.global_step, type(exception).__name__, path, path)


def rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA) and Python RNG states, in types ``weights_only`` loading accepts (Lightning's
    ``_collect_rng_states`` holds numpy arrays, which it refuses); numpy's global RNG is not used in training."""
    return {"torch": torch.get_rng_state(),
            "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch.cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class RngState(L.Callback):
    """The global RNG streams in every checkpoint, restored when training resumes from it (``ckpt_path=``):
    Lightning keeps them only in its own fault-tolerant mode, in types ``weights_only`` loading refuses."""

    @property
    def state_key(self) -> str:
        return "RngState"

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict)


def schedule_from_config(scheduler_fn: Callable | None, checkpoint: dict) -> None:
    """Resuming takes the schedule's shape from this run's config, its position from the checkpoint.

    A scheduler's state dict holds its constructor arguments (``T_max``, ``eta_min``, ...), which Lightning would
    restore over the config's: a run resumed with a larger ``trainer.max_steps`` would keep the first run's
    ``T_max`` and restart the learning rate. Those arguments of ``checkpoint``'s one scheduler are replaced here by
    those ``scheduler_fn`` (the run's partial scheduler) builds, before Lightning restores it."""
    saved = checkpoint.get("lr_schedulers") or []
    if scheduler_fn is None or len(saved) != 1:
        return
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fresh = scheduler_fn(optimizer=probe)
    args = set(inspect.signature(type(fresh).__init__).parameters) - {"self", "optimizer", "last_epoch", "verbose"}
    changed = {k: (saved[0][k], v) for k, v in fresh.state_dict().items()
               if k in args and k in saved[0] and saved[0][k] != v}
    for k, (old, new) in changed.items():
        saved[0][k] = new
        log.warning("resuming with scheduler %s=%s from this run's config (the checkpoint's run had %s)", k, new, old)
