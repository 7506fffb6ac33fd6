"""Every bad value a new user may type is refused before anything is built, in one line naming the key, the value and
the valid range (jfb_ip.lit.validate): the config is composed as train.py composes it and handed to the check that
train.py and evaluate.py run first. One table; each row is (overrides, the key and value the message must name, the
range it must state)."""
from __future__ import annotations

import pytest

from conftest import TINY, compose_cfg
from jfb_ip.lit.checks import check_run_config
from jfb_ip.lit.errors import ConfigError
from jfb_ip.nets import DnCNN
from jfb_ip.physics import Deblur, Inpaint

BAD = [
    # strings that read as booleans turn nothing on
    (["compile=no"], "compile='no'", "true or false"),
    (["channels_last=off"], "channels_last='off'", "true or false"),
    (["test=1"], "test=1", "true or false"),
    (["module.fixed_train_noise=yes"], "module.fixed_train_noise='yes'", "true or false"),
    (["method.net.spectral_norm=off"], "method.net.spectral_norm='off'", "true or false"),
    # converged in name only
    (["solver.tol=inf"], "solver.tol=inf", "in (0, 1)"),
    (["solver.tol=0"], "solver.tol=0", "in (0, 1)"),
    (["solver.max_iter=0"], "solver.max_iter=0", "an integer >= 1"),
    (["solver.bound=-1"], "solver.bound=-1", "> 0"),
    (["backward=neumann", "backward.neumann_k=-1"], "backward.neumann_k=-1", "an integer >= 0"),
    # numbers out of range, NaN, infinities
    (["task.noise_std=-0.1"], "task.noise_std=-0.1", ">= 0, finite"),
    (["task.noise_std=nan"], "task.noise_std=nan", ">= 0, finite"),
    (["task.noise_std=inf"], "task.noise_std=inf", ">= 0, finite"),
    (["task=denoise", "task.noise_std=[0,nan]"], "task.noise_std=[0, nan]", ">= 0, finite"),
    (["task=inpaint", "task.p_drop=1.5"], "task.p_drop=1.5", "in [0, 1)"),
    (["method.net.gamma=0"], "method.net.gamma=0", "> 0, finite"),
    (["method.net.gamma=-1"], "method.net.gamma=-1", "> 0, finite"),
    (["method.net.gamma=nan"], "method.net.gamma=nan", "> 0, finite"),
    (["method.net.gamma=inf"], "method.net.gamma=inf", "> 0, finite"),
    (["method.net.width=0"], "method.net.width=0", "an integer >= 1"),
    (["method.net.depth=2.5"], "method.net.depth=2.5", "an integer >= 2"),
    (["method.reg_weight=-1"], "method.reg_weight=-1", "> 0, finite"),
    (["module.gradient_clip_val=-1"], "module.gradient_clip_val=-1", "> 0, finite (or null)"),
    (["module.optimizer.lr=nan"], "module.optimizer.lr=nan", "> 0, finite"),
    (["module.optimizer.lr=-1"], "module.optimizer.lr=-1", "> 0, finite"),
    (["module.optimizer.weight_decay=-1"], "module.optimizer.weight_decay=-1", ">= 0, finite"),
    (["module.scheduler.T_max=0"], "module.scheduler.T_max=0", "an integer >= 1"),
    (["trainer.max_steps=-1"], "module.scheduler.T_max=-1 (from ${trainer.max_steps})", "an integer >= 1"),
    (["seed=abc"], "seed='abc'", "an integer in [0, 4.29497e+09]"),
    (["seed=-1"], "seed=-1", "an integer in [0, 4.29497e+09]"),
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5", "an integer >= 1 (or -1)"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc'", "an integer >= 1 (or -1)"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch=0", "an integer >= 1 (or null)"),
    # options of the same classes that no table row names: their _target_'s annotation, or no NaN anywhere
    (["method=luser_sw", "method.block.gamma=nan"], "method.block.gamma=nan", "a number, finite"),
    (["method=luser_sw", "method.shared_weights=no"], "method.shared_weights='no'", "true or false"),
    (["method=tv", "method.max_iter=2.5"], "method.max_iter=2.5", "an integer"),
    (["data.dataset.max_zoom_out=nan"], "data.dataset.max_zoom_out=nan", "a number, finite"),
    (["data.dataset.rot90=on"], "data.dataset.rot90='on'", "true or false"),
    # a key nothing reads
    (["+foo=1"], "+foo=1", "not an option of train.py"),
    (["+seeed=1"], "+seeed=1", "did you mean seed?"),
]


@pytest.mark.parametrize("overrides,named,valid", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_value_is_refused_in_one_line_naming_key_value_and_range(overrides, named, valid, tmp_path):
    cfg = compose_cfg("train", ["logger=none", *overrides], tmp_path)
    with pytest.raises(ConfigError) as e:
        check_run_config(cfg)
    message = str(e.value)
    assert named in message and valid in message and "\n" not in message, message


GOOD = [[], ["method=luser_sw"], ["method=mtdeq", "task=multitask"], ["method=tv"], ["method=pnp_admm"],
        ["method=lu_dncnn"], ["method=deprox"], ["method=denoiser"], ["method=wiener"], ["task=inpaint"], ["task=ct"],
        ["task=mri4x"], ["task=sr4"], ["task=denoise", "task.noise_std=[0,0.2]"], ["experiment=luser_ct"],
        ["debug=overfit"], ["trainer.max_steps=-1", "trainer.max_epochs=3", "module.scheduler.T_max=100"], ["solver.bound=inf"],
        ["module.gradient_clip_val=null"], ["+references.tv={_target_:jfb_ip.methods.TV}"]]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(g) or "defaults" for g in GOOD])
def test_the_shipped_configs_and_valid_values_pass(overrides, tmp_path):
    check_run_config(compose_cfg("train", ["logger=none", *overrides], tmp_path))


def _command_line_error(config: str, argv: list[str]) -> str:
    from jfb_ip.lit.validate import check_command_line

    with pytest.raises(ConfigError) as e:
        check_command_line(config, argv)
    return str(e.value)


@pytest.mark.parametrize("config,argv,named", [
    # output directories that cannot be made
    ("train", ["hydra.run.dir=/proc/jfb_ip_run"], "hydra.run.dir=/proc/jfb_ip_run: the output directory cannot be made"),
    ("train", ["hydra.run.dir=/dev/null/run"], "hydra.run.dir=/dev/null/run: the output directory cannot be made"),
    ("train", ["-m", "hydra.sweep.dir=/dev/null/sweep"], "hydra.sweep.dir=/dev/null/sweep: the output directory"),
    ("train", ["paths.output_dir={file}"], "a file is there, not a directory"),
    ("train", ["hydra.run.dir={file}/run"], "the output directory cannot be made"),
    # evaluate.py with a checkpoint: the model is the checkpoint's; data.* and solver.* need their group
    ("evaluate", ["ckpt_path=x.ckpt", "method.net.width=16"], "method.net.width=16: evaluate.py with ckpt_path= takes "
                                                              "the method, task and backward mode from the checkpoint"),
    ("evaluate", ["ckpt_path=x.ckpt", "task=inpaint"], "task=inpaint: evaluate.py with ckpt_path= takes"),
    ("evaluate", ["ckpt_path=x.ckpt", "+backward.neumann_k=3"], "+backward.neumann_k=3: evaluate.py with ckpt_path="),
    ("evaluate", ["ckpt_path=x.ckpt", "data.image_size=24"], "data.image_size=24: evaluate.py with ckpt_path= takes "
                                                             "data.* only with a data group"),
    ("evaluate", ["ckpt_path=x.ckpt", "solver.max_iter=200"], "e.g. solver=anderson solver.max_iter=200"),
])
def test_a_bad_command_line_is_refused_before_hydra_composes(config, argv, named, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    message = _command_line_error(config, argv)
    assert named.replace("{file}", str(tmp_path / "file")) in message and "\n" not in message, message


def test_the_command_lines_evaluate_takes_with_a_checkpoint_pass(tmp_path):
    from jfb_ip.lit.validate import check_command_line

    check_command_line("evaluate", ["ckpt_path=x.ckpt", "data=folder", "data.root=/d", "data.image_size=24",
                                    "solver=anderson", "solver.max_iter=200", "seed=3", f"hydra.run.dir={tmp_path}/o"])
    check_command_line("train", ["method.net.width=16", f"hydra.run.dir={tmp_path}/new/run"])
    assert (tmp_path / "new" / "run").is_dir()


@pytest.mark.integration
def test_an_unwritable_output_directory_is_one_line_from_train_py(tmp_path):
    from conftest import run_train

    r = run_train(["hydra.run.dir=/dev/null/run"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: hydra.run.dir=/dev/null/run: the output directory cannot be made "
                                             "(Not a directory: /dev/null/run); give a writable directory path"]


def test_a_model_far_below_the_measurement_is_warned_about_not_reported_as_a_result(tmp_path):
    """module.optimizer.lr=1e30 passes every range (a learning rate has no upper bound) and wrecks the model: the
    run still writes its table, with a warning in the log and in metrics.json."""
    import json

    from jfb_ip.lit.run import far_below, train

    out = train(compose_cfg("train", [*TINY, "module.optimizer.lr=1e30",
                                      f"paths.output_dir={tmp_path}"], tmp_path))
    assert out["test"]["model"]["psnr"] < out["test"]["measurement"]["psnr"] - 10
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["warnings"] == [far_below(out["test"])] and "lower module.optimizer.lr" in written["warnings"][0]
    table = {"measurement": {"psnr": 24.0, "ssim": 0.7}, "wiener": {"psnr": 26.0, "ssim": 0.8}}
    assert far_below({**table, "model": {"psnr": 20.5, "ssim": 0.6}}) is None  # 5.5 dB below: within 6 dB
    assert "the wiener row's (26.00 dB)" in far_below({**table, "model": {"psnr": 19.5, "ssim": 0.6}})
    assert far_below({**table, "model": {"psnr": float("nan"), "ssim": float("nan")}}) is not None


@pytest.mark.parametrize("build,named", [
    (lambda: DnCNN(spectral_norm=True, gamma=0.0), "gamma=0.0"),
    (lambda: DnCNN(spectral_norm=True, gamma=float("nan")), "gamma=nan"),
    (lambda: DnCNN(width=0), "width=0"),
    (lambda: DnCNN(depth=2.5), "depth=2.5"),
    (lambda: Deblur(noise_std=-0.1), "noise_std=-0.1"),
    (lambda: Inpaint(noise_std=float("inf")), "noise_std=inf"),
])
def test_the_python_api_refuses_the_same_values_at_construction(build, named):
    with pytest.raises(ValueError, match=named):
        build()
