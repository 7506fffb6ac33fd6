"""Faults, resume and checkpoints: a training process killed with SIGKILL and resumed from its periodic
last.ckpt ends with exactly the weights of an uninterrupted run; checkpoint writes are atomic; an on-exception
checkpoint never replaces an earlier one; resuming is only ever explicit; the resumed schedule follows the config;
a batch whose every sample diverged takes no step."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, TINY, run_train
from jfb_ip.lit import ReconstructionModule
from jfb_ip.lit.checkpointing import AtomicCheckpointIO, KeepingOnExceptionCheckpoint
from jfb_ip.methods import Method, Reconstruction
from jfb_ip.physics import Deblur

# 3 batches per epoch (12 crops of 4), a periodic last.ckpt every 4 steps (the first one mid-epoch: epoch 1, batch 1),
# validation (and the best checkpoint) every 2 epochs, deterministic CPU kernels
RESUME = [o for o in TINY if not o.startswith("data.dataset.train_samples")] + [
    "data.dataset.train_samples=12", "trainer.limit_train_batches=1.0", "trainer.max_steps=12",
    "trainer.check_val_every_n_epoch=2", "trainer.deterministic=true", "callbacks.model_checkpoint.every_n_train_steps=4",
    "test=false"]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} tensors differ, e.g. {differ[:3]}"
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def _kill_after_first_periodic_checkpoint(args: list[str], tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = tmp / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


@pytest.mark.integration
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """Uninterrupted run vs. the same run killed (SIGKILL, no clean-up) right after its first periodic last.ckpt
    and resumed with ckpt_path=: the final weights, optimizer moments and schedule are identical (torch.equal)."""
    full = run_train([*RESUME, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = _kill_after_first_periodic_checkpoint([*RESUME, f"hydra.run.dir={killed_dir}"], tmp_path)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    last = killed_dir / "checkpoints" / "last.ckpt"
    at_kill = _load(last)
    assert 4 <= at_kill["global_step"] < 12 and at_kill["global_step"] % 4 == 0
    assert at_kill["global_step"] % 3, "the first periodic checkpoint must fall mid-epoch to test the data order"

    resumed = run_train([*RESUME, f"hydra.run.dir={killed_dir}", f"ckpt_path={last}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_training_state(_load(tmp_path / "full" / "checkpoints" / "last.ckpt"), _load(last))


@pytest.mark.integration
def test_a_rerun_in_a_run_directory_with_checkpoints_is_refused(tmp_path):
    """No silent resume (Lightning's default with an on-exception callback) and no overwritten checkpoints."""
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.ckpt").write_bytes(b"an earlier run's state")
    r = run_train([*TINY, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode != 0
    assert f"resume it with ckpt_path={ckpts / 'last.ckpt'}" in r.stderr
    assert (ckpts / "last.ckpt").read_bytes() == b"an earlier run's state"


@pytest.mark.integration
def test_resuming_with_more_steps_takes_t_max_from_the_config(tmp_path):
    """The checkpoint's scheduler holds T_max = the first run's max_steps; resumed with max_steps=6 the cosine
    schedule runs to 6 (the learning rate reaches eta_min at the new end, not at the old one)."""
    first = run_train([*TINY, "trainer.max_steps=3", "test=false", f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert _load(ckpt)["lr_schedulers"][0]["T_max"] == 3
    more = run_train([*TINY, "trainer.max_steps=6", "trainer.limit_train_batches=1.0", "test=false",
                      f"hydra.run.dir={tmp_path / 'b'}", f"ckpt_path={ckpt}"], tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    out = _load(tmp_path / "b" / "checkpoints" / "last.ckpt")
    sched = out["lr_schedulers"][0]
    assert out["global_step"] == 6 and sched["T_max"] == 6 and sched["last_epoch"] == 6
    assert sched["_last_lr"][0] == pytest.approx(sched["eta_min"], abs=1e-9)  # the end of the new cosine


def test_atomic_checkpoint_write_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.arange(5.0)}, "global_step": 3}
    io.save_checkpoint(good, path)

    def dies_mid_write(obj, fh, *a, **k):  # what a kill while writing leaves: some bytes, then nothing
        fh.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(5)}, "global_step": 4}, path)
    monkeypatch.undo()
    back = _load(path)
    assert back["global_step"] == 3 and torch.equal(back["state_dict"]["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_on_exception_checkpoint_never_overwrites_an_earlier_one(tmp_path):
    class Trainer:
        global_step = 0

        def save_checkpoint(self, path, weights_only=None):
            assert weights_only is False  # the full training state (optimizer, loops), or it could not be resumed
            Path(path).write_text(f"step {self.global_step}")

    cb, trainer = KeepingOnExceptionCheckpoint(tmp_path), Trainer()
    trainer.global_step = 40
    cb.on_exception(trainer, None, RuntimeError("first"))
    trainer.global_step = 0  # a resumed run failing before its state was restored
    cb.on_exception(trainer, None, RuntimeError("second"))
    assert (tmp_path / "on_exception.ckpt").read_text() == "step 40"
    assert (tmp_path / "on_exception-v1.ckpt").read_text() == "step 0" and cb.saved_path.endswith("-v1.ckpt")


class _Explodes(Method):
    """A method whose solve diverges on bright images (mean > 0.8) and is a learnable scaling otherwise."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, meas):
        bright = meas.y.flatten(1).mean(1) > 0.8
        return Reconstruction(torch.where(bright.reshape(-1, 1, 1, 1), torch.full_like(meas.y, float("nan")),
                                          self.w * meas.y))


def test_a_batch_whose_every_sample_diverged_moves_neither_global_step_nor_the_schedule():
    """A real Trainer: batch 0 all bright (diverges), batches 1-3 dark. max_steps=3 takes 4 batches, and the
    scheduler stepped 3 times: the skipped batch counts as no step at all."""
    x = torch.cat([torch.full((2, 3, 8, 8), 0.95), 0.3 * torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))])
    loader = DataLoader(TensorDataset(x, torch.arange(8)), batch_size=2)
    module = ReconstructionModule(_Explodes(), Deblur(kernel_size=3, channels=3),
                                  optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                                  scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3 and module.skipped_samples == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
