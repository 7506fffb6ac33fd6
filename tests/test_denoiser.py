"""The noise-conditioned UNet (Willingham et al. [4] §III-B), method=denoiser and loading it as a prior."""
from __future__ import annotations

import math

import pytest
import torch

from jfb_ip.nets import NoiseConditionedUNet


def _net(**kw) -> NoiseConditionedUNet:
    torch.manual_seed(0)
    return NoiseConditionedUNet(channels=kw.pop("channels", 3), features=kw.pop("features", (8, 16, 32)),
                                blocks=kw.pop("blocks", 1), **kw)


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (5, 9), (1, 1)])
def test_unet_accepts_any_size(size):
    net = _net()
    x = torch.rand(2, 3, *size)
    out = net(x, 0.05)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_pads_by_replication_and_crops_back():
    """An odd-sized image gives the crop of the output on its replicate-padded version (DRUNet's test-time padding):
    checked against the net run on an image padded independently, by index repetition."""
    net = _net(residual=False)
    x = torch.rand(1, 3, 13, 10)
    rows = torch.tensor(list(range(13)) + [12, 12, 12])  # to 16: the next multiple of 2**2
    cols = torch.tensor(list(range(10)) + [9, 9])  # to 12
    padded = x[:, :, rows][:, :, :, cols]
    with torch.no_grad():
        assert torch.allclose(net(x, 0.1), net(padded, 0.1)[..., :13, :10], atol=1e-6)


def test_unet_output_depends_on_the_noise_map():
    net = _net()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        a, b = net(x, 0.0), net(x, 0.2)
    assert (a - b).abs().max() > 1e-4
    # the map is the only way sigma enters: the head conv's last input channel
    with torch.no_grad():
        net.head.weight[:, -1].zero_()
        assert torch.allclose(net(x, 0.0), net(x, 0.2))


def test_unet_per_sample_sigma_matches_separate_calls():
    net = _net()
    x = torch.rand(3, 3, 12, 12)
    sigma = torch.tensor([0.0, 0.05, 0.2])
    with torch.no_grad():
        batched = net(x, sigma)
        single = torch.cat([net(x[i:i + 1], float(sigma[i])) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_unet_residual_mode_and_gradients():
    net = _net(residual=True)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        net.tail.weight.zero_()
    assert torch.equal(net(x, 0.1), x)  # residual: x + tail(...), so a zero tail is the identity
    torch.manual_seed(1)
    net = _net(bias=True)
    net(x, torch.tensor([0.1, 0.2])).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_unet_bad_input_is_one_clear_error():
    net = _net()
    with pytest.raises(ValueError, match="sigma must be a float or one value per sample"):
        net(torch.rand(2, 3, 8, 8), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="set the net's channels"):
        net(torch.rand(2, 1, 8, 8), 0.1)
    with pytest.raises(ValueError, match="features"):
        NoiseConditionedUNet(features=())


# ---------------------------------------------------------------- task=denoise, method=denoiser, loading
def test_denoise_task_draws_a_noise_level_per_sample_and_repeats_by_seed():
    from jfb_ip.physics import Denoise

    task = Denoise(noise_std=[0.05, 0.2])
    x = torch.rand(64, 3, 32, 32)
    meas = task.sample(x, seeds=torch.arange(64))
    assert meas.sigma.min() >= 0.05 and meas.sigma.max() <= 0.2 and meas.sigma.std() > 0.02
    # the noise std of every sample is its sigma (estimated from y - x over 3072 pixels)
    est = (meas.y - x).flatten(1).std(1)
    assert torch.allclose(est, meas.sigma, rtol=0.06)
    again = task.sample(x[[3, 1]], seeds=torch.tensor([3, 1]))  # per-sample seeds: independent of the batch
    assert torch.equal(again.y, meas.y[[3, 1]]) and torch.equal(again.sigma, meas.sigma[[3, 1]])
    train = task.sample(x, torch.Generator().manual_seed(0))
    assert train.sigma.shape == (64,) and not torch.equal(train.sigma, meas.sigma)
    assert torch.equal(Denoise(noise_std=0.1).sample(x[:2], seeds=torch.arange(2)).sigma, torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="noise_std must lie in"):
        Denoise(noise_std=[0.3, 0.1])


def test_identity_operator_is_exact():
    from jfb_ip.physics import Identity
    from jfb_ip.methods import tikhonov
    from jfb_ip.physics import Measurement

    op = Identity()
    x, v = torch.rand(2, 3, 5, 7, dtype=torch.float64), torch.rand(2, 3, 5, 7, dtype=torch.float64)
    assert torch.equal(op.A(x), x) and torch.equal(op.A_adjoint(x), x)
    assert torch.equal(op.lambda_max(x.shape, torch.float64), torch.ones(2, dtype=torch.float64))
    rho = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # argmin 1/2||u - x||^2 + rho/2||u - v||^2, by its optimality condition (u - x) + rho (u - v) = 0
    p = op.prox_data(v, rho, x)
    assert torch.allclose((p - x) + rho.reshape(-1, 1, 1, 1) * (p - v), torch.zeros_like(p), atol=1e-12)
    # the FFT (Fourier multiplier) Tikhonov path equals CG on the same identity-prior normal equations
    meas = Measurement(y=x, physics=op, sigma=torch.zeros(2), x_shape=x.shape)
    assert torch.allclose(tikhonov(meas, 0.3, "identity"), x / 1.3, atol=1e-12)


def _tiny_denoiser_overrides() -> list[str]:
    from conftest import TINY

    return [o for o in TINY if not o.startswith(("method.", "solver.", "task."))] + \
        ["method=denoiser", "method.net.features=[8,16]", "method.net.blocks=1"]


def test_method_denoiser_picks_task_denoise_and_fast_dev_runs(tmp_path):
    from conftest import compose_cfg
    from jfb_ip.lit.run import train

    cfg = compose_cfg("train", _tiny_denoiser_overrides() + ["debug=fast_dev_run"], tmp_path)
    assert cfg.task._target_ == "jfb_ip.physics.Denoise" and cfg.get("solver") is None
    out = train(cfg)
    assert out["test"]["n_images"] == 4 and math.isfinite(out["test"]["model"]["psnr"])
    # a task on the command line wins over the method's pick
    assert compose_cfg("train", ["method=denoiser", "task=inpaint"], tmp_path).task._target_ == "jfb_ip.physics.Inpaint"


def test_refuses_solver_options(tmp_path):
    from conftest import compose_cfg
    from jfb_ip.lit.checks import check_run_config
    from jfb_ip.methods import Denoiser
    from jfb_ip.nets import NoiseConditionedUNet

    cfg = compose_cfg("train", ["method=denoiser", "solver=anderson"], tmp_path)
    with pytest.raises(Exception, match="method=denoiser has no fixed point to solve, so solver=anderson"):
        check_run_config(cfg)
    with pytest.raises(Exception, match="method=denoiser is one network pass"):
        Denoiser(NoiseConditionedUNet(3, features=[4]), solver={"name": "anderson"})


def test_trained_checkpoint_loads_as_a_prior(tmp_path):
    """train.py method=denoiser writes last.ckpt; load_network rebuilds exactly its net(x, sigma)."""
    from conftest import compose_cfg
    from jfb_ip.checkpoint import load_checkpoint, load_network
    from jfb_ip.lit.run import build_module, train
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", _tiny_denoiser_overrides() + ["trainer.max_steps=2"], tmp_path)
    train(cfg)
    path = tmp_path / "checkpoints" / "last.ckpt"
    net = load_network(path, noise_conditioned=True)
    ckpt = load_checkpoint(path)  # the module as evaluate.py rebuilds it, independently of load_network
    module = build_module(OmegaConf.create(ckpt["hyper_parameters"]["run_config"]))
    module.load_state_dict(ckpt["state_dict"])
    x = torch.rand(2, 3, 16, 16)
    sigma = torch.tensor([0.02, 0.15])
    with torch.no_grad():
        assert torch.equal(net(x, sigma), module.method.net.eval()(x, sigma))
        assert not torch.equal(net(x, sigma), _net()(x, sigma))


# --- the plain multi-scale UNet (method.net of the equilibrium methods) ---

def test_plain_unet_sees_far_beyond_dncnn():
    """Three levels of two convs reach pixels 20 away from an output pixel; an 8-layer DnCNN's receptive field is 17
    pixels (8 either side), so its input gradient beyond that is exactly zero: both measured by autograd."""
    from jfb_ip.nets import DnCNN, UNet

    def input_gradient(net) -> torch.Tensor:
        x = torch.rand(1, 1, 64, 64, requires_grad=True)
        net(x)[0, 0, 32, 32].backward()
        return x.grad[0, 0].abs()

    torch.manual_seed(0)
    g = input_gradient(UNet(1, features=(8, 8, 8), convs=2))
    assert min(g[32, 12], g[32, 52], g[12, 32], g[52, 32]) > 0
    g = input_gradient(DnCNN(1, depth=8, width=8))
    assert min(g[32, 24], g[32, 40], g[24, 32], g[40, 32]) > 0
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    beyond = torch.maximum((rows - 32).abs(), (cols - 32).abs()) > 8
    assert g[beyond].max() == 0


def test_plain_unet_normalises_every_conv_to_gamma():
    """In 'kernel' mode every conv (strided and transposed ones too) has the spectral norm gamma of its reshaped kernel,
    checked with an SVD once the power iteration has run a few training passes."""
    from jfb_ip.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, features=(4, 8), convs=1, gamma=1.6)
    for _ in range(30):
        net(torch.rand(2, 2, 8, 8))
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 7  # head, down stage + strided conv, body, transposed conv + up stage, tail
    for m in convs:
        w = m.weight.detach()
        mat = (w.transpose(0, 1) if isinstance(m, torch.nn.ConvTranspose2d) else w).flatten(1)
        assert torch.linalg.matrix_norm(mat, ord=2).item() == pytest.approx(1.6, rel=1e-3)


def test_plain_unet_any_size_and_a_clear_shape_error():
    from jfb_ip.nets import UNet

    net = UNet(3, features=(4, 8, 8), convs=1)
    for size in ((13, 10), (1, 1), (48, 48)):
        assert net(torch.rand(2, 3, *size)).shape == (2, 3, *size)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        net(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="features"):
        UNet(3, features=())
