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
from types import SimpleNamespace

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
    class Trainer:  # between two steps: 7 batches started, 7 measurements made
        global_step = 0
        fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
            total=SimpleNamespace(ready=7))))
        lightning_module = SimpleNamespace(_train_batches=7)

        def save_checkpoint(self, path, weights_only=None):
            assert weights_only is False  # the full training state (optimizer, loops), or it could not be resumed
            Path(path).write_text(f"step {self.global_step}")

    cb, trainer = KeepingOnExceptionCheckpoint(tmp_path), Trainer()
    trainer.global_step = 40
    cb.on_train_start(trainer, None)
    cb.on_exception(trainer, None, RuntimeError("first"))
    trainer.global_step = 0  # a resumed run failing before its state was restored
    cb.on_train_start(trainer, None)
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


# in-process runs: 3 batches per epoch, 5 steps, no periodic checkpoint before the end
MID_STEP = [o for o in RESUME if not o.startswith(("trainer.max_steps", "callbacks.model_checkpoint"))] + [
    "trainer.max_steps=5", "callbacks.model_checkpoint.every_n_train_steps=100"]


def _sigint_inside_step(monkeypatch, step: int, times: int) -> None:
    """Send SIGINT ``times`` times from inside the network's forward pass in training step ``step`` (1-based): the
    batch is drawn, its random stream advanced, the spectral-norm power iteration half done, no optimizer step yet."""
    import jfb_ip.nets

    forward, sent = jfb_ip.nets.DnCNN.forward, []

    def interrupting(net, *a, **k):
        out = forward(net, *a, **k)
        module_batches = _sigint_inside_step.module._train_batches
        if net.training and module_batches == step and len(sent) < times:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(jfb_ip.nets.DnCNN, "forward", interrupting)


def _train_in_process(overrides: list[str], out_dir: Path):
    from conftest import compose_cfg
    from jfb_ip.lit import run

    build = run.build_module

    def keep(*a, **k):  # the module of this run, for the interrupting forward to read its batch count
        _sigint_inside_step.module = build(*a, **k)
        return _sigint_inside_step.module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "build_module", keep)
        return run.train(compose_cfg("train", [*overrides, f"paths.output_dir={out_dir}"], out_dir))


def test_ctrl_c_inside_a_step_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """SIGINT arrives inside training step 2 (mid-epoch); training stops at the end of that step and writes
    on_exception.ckpt there; resumed with ckpt_path=, the final weights, spectral-norm vectors, Adam moments and
    schedule are torch.equal to an uninterrupted run's."""
    _train_in_process(MID_STEP, tmp_path / "full")
    handler = signal.getsignal(signal.SIGINT)
    _sigint_inside_step(monkeypatch, step=2, times=1)
    with pytest.raises(SystemExit):  # Lightning ends an interrupted fit with sys.exit(1)
        _train_in_process(MID_STEP, tmp_path / "stopped")
    assert signal.getsignal(signal.SIGINT) is handler  # the deferring handler is gone with the fit
    saved = tmp_path / "stopped" / "checkpoints" / "on_exception.ckpt"
    assert _load(saved)["global_step"] == 2  # the interrupted step finished, and no other began
    monkeypatch.undo()
    _train_in_process([*MID_STEP, f"ckpt_path={saved}"], tmp_path / "resumed")
    _assert_same_training_state(_load(tmp_path / "full" / "checkpoints" / "last.ckpt"),
                                _load(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))


def test_a_second_ctrl_c_stops_inside_the_step_and_writes_no_checkpoint(tmp_path, monkeypatch):
    _sigint_inside_step(monkeypatch, step=2, times=2)
    with pytest.raises(SystemExit):
        _train_in_process(MID_STEP, tmp_path / "stopped")
    assert not list((tmp_path / "stopped" / "checkpoints").glob("on_exception*.ckpt"))


@pytest.mark.integration
def test_sigterm_stops_at_a_step_boundary_and_exits_143(tmp_path):
    """SIGTERM (a scheduler's stop) during training: the state after a whole step in on_exception.ckpt, no
    metrics.json, exit status 143 so a scheduler or a sweep counts the job as failed."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [o for o in RESUME if not o.startswith("trainer.max_steps")] + ["trainer.max_steps=100000",
                                                                          f"hydra.run.dir={out}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # training has begun (first periodic checkpoint at step 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SIGTERM" in err
    saved = _load(out / "checkpoints" / "on_exception.ckpt")
    assert saved["global_step"] >= 4 and not (out / "metrics.json").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The last.ckpt of a 2-step run of the tiny DE-GRAD on deblurring."""
    out = tmp_path_factory.mktemp("tiny")
    _train_in_process([*TINY, "test=false"], out)
    return out / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("change,named", [
    (["task=inpaint"], "task._target_: 'jfb_ip.physics.Deblur' -> 'jfb_ip.physics.Inpaint'"),
    (["method.net.width=16"], "method.net.width: 8 -> 16"),
    (["method=lu_dncnn"], "method._target_: 'jfb_ip.methods.DEGRAD' -> 'jfb_ip.methods.LUDnCNN'"),
    (["data.channels=1"], "data.channels: 3 -> 1"),
])
def test_resuming_as_another_model_or_task_is_refused(tiny_checkpoint, change, named, tmp_path):
    from jfb_ip.lit.errors import ConfigError

    group = change[0].split("=")[0]
    overrides = [o for o in TINY if not (group in ("method", "task") and o.startswith((f"{group}.", "solver.")))]
    with pytest.raises(ConfigError) as e:
        _train_in_process([*overrides, *change, f"ckpt_path={tiny_checkpoint}"], tmp_path)
    assert named in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_resuming_with_another_seed_or_batch_size_names_the_changes(tiny_checkpoint, tmp_path, caplog):
    _train_in_process([*TINY, "seed=1", "data.batch_size=2", "test=false", f"ckpt_path={tiny_checkpoint}"], tmp_path)
    warned = [r.getMessage() for r in caplog.records if "resuming with settings" in r.getMessage()]
    assert warned and "seed: 0 -> 1" in warned[0] and "data.batch_size: 4 -> 2" in warned[0], warned


def test_checkpoint_errors_name_the_cause(tiny_checkpoint, tmp_path):
    """A NaN weight is named on loading (not blamed on the solver); a directory is a directory; another model's
    state dict is one line naming the first tensor that does not fit."""
    from conftest import compose_cfg
    from jfb_ip.checkpoint import CheckpointError, check_state_fits, load_checkpoint
    from jfb_ip.lit.run import build_module

    ckpt = _load(tiny_checkpoint)
    name = next(k for k, v in ckpt["state_dict"].items() if k.startswith("method.net.") and v.numel() > 3)
    ckpt["state_dict"][name].view(-1)[3] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=rf"{name} holds 1 NaN/inf of \d+ values"):
        load_checkpoint(tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=f"ckpt_path={tiny_checkpoint.parent} is a directory: give a checkpoint "
                                              f"file, e.g. ckpt_path={tiny_checkpoint}"):
        load_checkpoint(tiny_checkpoint.parent)
    wider = build_module(compose_cfg("train", [*TINY, "method.net.width=16"], tmp_path))
    with pytest.raises(CheckpointError, match=r"method.net.body.0.bias has shape \[8\] there and \[16\] here"):
        check_state_fits(wider, load_checkpoint(tiny_checkpoint), tiny_checkpoint)
    check_state_fits(build_module(compose_cfg("train", list(TINY), tmp_path)), load_checkpoint(tiny_checkpoint),
                     tiny_checkpoint)
