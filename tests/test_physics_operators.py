"""Inpainting, Downsampling, MRI and CT operators checked against independent computations:
dense matrices built from basis vectors, analytic Radon transforms, MATLAB's bicubic weights,
PyTorch's own antialiased bicubic resize."""
import math

import pytest
import torch
import torch.nn.functional as F

from jfb_ip.physics import CT, MRI, Downsampling, Inpainting, Measurement
from jfb_ip.linalg import batch_dot, batch_norm2

torch.set_num_threads(1)
F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def dense(fn, shape, i=0) -> torch.Tensor:
    """Matrix of sample ``i`` of a batched linear map on inputs of ``shape`` (B, ...): column j
    is the output of sample i when sample i of the input is the j-th basis vector."""
    n = math.prod(shape[1:])
    cols = []
    for j in range(n):
        e = torch.zeros(shape, dtype=F64)
        e[i].view(-1)[j] = 1
        cols.append(fn(e)[i].flatten())
    return torch.stack(cols, dim=1)


def relative_adjoint_gap(op, x_shape, y_shape, seed=0):
    g = gen(seed)
    x = torch.randn(x_shape, generator=g, dtype=F64)
    y = torch.randn(y_shape, generator=g, dtype=F64)
    Ax, Aty = op.A(x), op.A_adjoint(y)
    assert Ax.shape == torch.Size(y_shape) and Aty.shape == torch.Size(x_shape)
    gap = (batch_dot(Ax, y) - batch_dot(x, Aty)).abs()
    return (gap / (batch_norm2(Ax) * batch_norm2(y)).clamp_min(1e-300)).max().item()


def kspace_shape(shape):
    return (shape[0], 2 * shape[1], *shape[2:])


def ct_sino_shape(op, shape):
    return (shape[0], shape[1], op.n_angles, op.detector_size)


# ---- (a) adjointness, float64, odd sizes, several batch/channel shapes --------------------
ADJOINT_CASES = [
    ("inpaint per-sample", lambda s: Inpainting.random(s, 0.5, gen(1), dtype=F64), lambda op, s: s,
     [(2, 3, 9, 11), (3, 1, 7, 13)]),
    ("inpaint shared", lambda s: Inpainting.random((1, *s[1:]), 0.3, gen(2), dtype=F64), lambda op, s: s,
     [(4, 2, 9, 11)]),
    *[(f"down x{f} {filt}", (lambda f, filt: lambda s: Downsampling(f, filt))(f, filt),
       (lambda f: lambda op, s: (s[0], s[1], s[2] // f, s[3] // f))(f), shapes)
      for f, shapes in [(2, [(2, 3, 10, 14), (1, 1, 6, 8)]), (3, [(2, 3, 9, 15), (3, 2, 3, 6)]),
                        (4, [(2, 1, 8, 12), (1, 3, 4, 4)])]
      for filt in ("bicubic", "gaussian")],
    ("mri columns per-sample", lambda s: MRI.random(s, 4, generator=gen(3), dtype=F64), lambda op, s: kspace_shape(s),
     [(2, 1, 9, 11), (3, 2, 8, 13)]),
    ("mri shared", lambda s: MRI.random(s, 8, generator=gen(4), per_sample=False, dtype=F64),
     lambda op, s: kspace_shape(s), [(3, 1, 7, 9)]),
    ("mri full 2D masks", lambda s: MRI((torch.rand(s[0], 1, *s[2:], generator=gen(5)) < 0.4).to(F64)),
     lambda op, s: kspace_shape(s), [(2, 2, 9, 10)]),
    ("ct", lambda s: CT.parallel_beam(s[-2:], n_angles=7), ct_sino_shape, [(2, 2, 11, 11), (1, 3, 9, 13)]),
    ("ct random angles, chunked", lambda s: CT(torch.rand(5, generator=gen(6)) * 6.3, s[-2:], detector_size=9,
                                                max_elements=300, matrix_nnz=0), ct_sino_shape, [(2, 1, 7, 8)]),
    ("ct grid_sample kernels", lambda s: CT.parallel_beam(s[-2:], n_angles=7, matrix_nnz=0), ct_sino_shape,
     [(2, 2, 11, 11)]),
]


@pytest.mark.parametrize("name,make,yshape,shapes", ADJOINT_CASES, ids=[c[0] for c in ADJOINT_CASES])
def test_adjointness_float64(name, make, yshape, shapes):
    for s in shapes:
        op = make(s)
        assert relative_adjoint_gap(op, s, yshape(op, s)) < 1e-8, (name, s)


# ---- (b) lambda_max and (c) closed-form prox against dense matrices -------------------------
def _single_column_mri(W=10):
    # one column away from DC and Nyquist: its mirror is unsampled, so lambda_max(A^T A) is 1/2, not 1
    m = torch.zeros(2, 1, 1, W, dtype=F64)
    m[0, ..., W // 2 + 2] = 1
    m[1, ..., [W // 2, W // 2 + 1, W // 2 - 3]] = 1
    return MRI(m)


DENSE_CASES = [
    ("inpaint", lambda: Inpainting.random((3, 2, 5, 6), torch.tensor([0.3, 1.0, 0.7]), gen(7), dtype=F64),
     (3, 2, 5, 6), lambda s: s),
    *[(f"down x{f} {filt}", (lambda f, filt: lambda: Downsampling(f, filt))(f, filt), s,
       (lambda f: lambda s: (s[0], s[1], s[2] // f, s[3] // f))(f))
      for f, s in [(2, (1, 1, 8, 10)), (3, (1, 1, 9, 15)), (4, (1, 1, 12, 8))] for filt in ("bicubic", "gaussian")],
    ("mri random", lambda: MRI.random((2, 1, 8, 10), 4, generator=gen(8), dtype=F64), (2, 1, 8, 10), kspace_shape),
    ("mri one column", _single_column_mri, (2, 1, 6, 10), kspace_shape),
    ("mri 2D masks", lambda: MRI((torch.rand(2, 1, 7, 6, generator=gen(9)) < 0.3).to(F64)), (2, 1, 7, 6),
     kspace_shape),
    ("ct", lambda: CT.parallel_beam(8), (1, 1, 8, 8), None),
]


@pytest.mark.parametrize("name,make,shape,yshape", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_lambda_max_and_prox_match_dense_matrix(name, make, shape, yshape):
    op = make()
    lam = op.lambda_max(shape, F64)
    assert lam.shape == (shape[0],)
    ys = yshape(shape) if yshape is not None else ct_sino_shape(op, shape)
    g = gen(10)
    v = torch.randn(shape, generator=g, dtype=F64)
    y = torch.randn(ys, generator=g, dtype=F64)
    rho = torch.linspace(0.05, 2.0, shape[0], dtype=F64)
    # CT has no closed form: the base-class CG, driven to a tight tolerance
    prox = op.prox_data(v, rho, y, n_iter=500, tol=1e-13) if isinstance(op, CT) else op.prox_data(v, rho, y)
    for i in range(shape[0]):
        A = dense(op.A, shape, i)
        top = torch.linalg.svdvals(A)[0] ** 2
        assert lam[i].item() == pytest.approx(top.item(), rel=1e-4, abs=1e-12), (name, i)
        n = A.shape[1]
        rhs = A.T @ y[i].flatten() + rho[i] * v[i].flatten()
        ref = torch.linalg.solve(A.T @ A + rho[i] * torch.eye(n, dtype=F64), rhs)
        assert torch.allclose(prox[i].flatten(), ref, rtol=1e-8, atol=1e-9), (name, i)
    if name == "mri one column":
        assert lam[0].item() == pytest.approx(0.5)  # the symmetrised multiplier, not max|mask| = 1
    if name == "inpaint":
        assert lam.tolist() == [1.0, 0.0, 1.0]  # p_drop = 1 drops every pixel of sample 1


# ---- (d) masks ------------------------------------------------------------------------------
def test_inpainting_masks_per_sample_shared_over_channels_and_drop_rate():
    p = torch.tensor([0.2, 0.5, 0.9])
    op = Inpainting.random((3, 3, 200, 200), p, gen(11))
    assert op.mask.shape == (3, 1, 200, 200)
    dropped = 1 - op.mask.flatten(1).mean(1)
    assert torch.allclose(dropped, p, atol=0.01)
    # the same dropped pixels in every colour channel
    out = op.A(torch.ones(3, 3, 200, 200))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    # a float p_drop: fresh mask per sample, with the right rate
    op = Inpainting.random((4, 1, 64, 64), 0.6, gen(12))
    assert all(not torch.equal(op.mask[0], op.mask[i]) for i in range(1, 4))
    assert (1 - op.mask.mean()).item() == pytest.approx(0.6, abs=0.02)
    # reproducible with the generator; y lives in the image domain and init returns it
    assert torch.equal(op.mask, Inpainting.random((4, 1, 64, 64), 0.6, gen(12)).mask)
    y = op.A(torch.rand(4, 1, 64, 64))
    assert op.init(y) is y
    with pytest.raises(ValueError, match="mask"):
        op.A(torch.rand(4, 1, 32, 32))


def test_inpainting_fill_is_the_normalized_convolution_of_the_kept_neighbours():
    """init="fill" against an explicit Gaussian-weighted mean: a 9x9 image with its centre and one corner pixel
    dropped; the centre's 7x7 window (sigma 0.7) reaches kept pixels at the first width, so its value is
    sum_kept g(d) x / sum_kept g(d); kept pixels keep y; linear in y; a mask with nothing kept gives 0 (the mean of
    no pixels), never NaN."""
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=gen(5))
    m = torch.ones(1, 1, 9, 9, dtype=torch.float64)
    m[..., 4, 4] = m[..., 0, 0] = 0
    op = Inpainting(m, init="fill")
    y = op.A(x)
    out = op.init(y)
    d = torch.arange(-3, 4, dtype=torch.float64)
    g = torch.exp(-(d[:, None] ** 2 + d[None] ** 2) / (2 * 0.7 ** 2)) * m[0, 0, 1:8, 1:8]
    expected = (g * x[..., 1:8, 1:8]).sum((-2, -1)) / g.sum()
    assert torch.allclose(out[..., 4, 4], expected, rtol=1e-10)
    kept = m.expand_as(x) > 0
    assert torch.equal(out[kept], y[kept])
    y2 = op.A(torch.rand(2, 3, 9, 9, dtype=torch.float64, generator=gen(6)))
    assert torch.allclose(op.init(2 * y - 3 * y2), 2 * out - 3 * op.init(y2), atol=1e-12)
    empty = Inpainting(torch.zeros(1, 1, 9, 9), init="fill")
    assert torch.equal(empty.init(torch.zeros(1, 3, 9, 9)), torch.zeros(1, 3, 9, 9))
    with pytest.raises(ValueError, match="init must be one of"):
        Inpainting(m, init="bilinear")


@pytest.mark.parametrize("acc,n_low", [(4, 26), (8, 13)])
def test_mri_random_masks_follow_fastmri(acc, n_low):
    B, W = 6, 320
    op = MRI.random((B, 1, 16, W), acc, generator=gen(13))
    m = op.mask
    assert m.shape == (B, 1, 1, W)
    assert torch.allclose(m.flatten(1).mean(1), torch.full((B,), 1 / acc), atol=1 / W)
    # fastMRI's centre fraction (0.08 at 4x, 0.04 at 8x) around the zero frequency, W // 2 when centred
    band = m[..., W // 2 - n_low // 2: W // 2 + (n_low + 1) // 2]
    assert band.shape[-1] == n_low and bool((band == 1).all())
    assert all(not torch.equal(m[0], m[i]) for i in range(1, B))
    shared = MRI.random((B, 1, 16, W), acc, generator=gen(13), per_sample=False)
    assert shared.mask.shape[0] == 1
    y = shared.A(torch.rand(B, 1, 16, W))
    sampled = (y[:, 0].abs().sum(1) > 0).float()  # (B, W): which columns carry signal
    assert torch.equal(sampled, sampled[:1].expand_as(sampled))


def test_mri_kspace_layout_and_zero_filled_init():
    # k-space is centred and stored as [real, imag] channels: a constant image puts all its
    # energy at (H//2, W//2) of the real channel, scaled by sqrt(HW) (orthonormal FFT)
    H, W = 8, 10
    op = MRI.random((2, 1, H, W), 4, generator=gen(14), dtype=F64)
    y = op.A(torch.full((2, 1, H, W), 0.5, dtype=F64))
    assert y.shape == (2, 2, H, W)
    expect = torch.zeros_like(y)
    expect[:, 0, H // 2, W // 2] = 0.5 * math.sqrt(H * W)
    assert torch.allclose(y, expect, atol=1e-12)
    # the full mask gives back the image: A^T A = I, and init is the zero-filled inverse FFT
    full = MRI(torch.ones(1, 1, 1, W, dtype=F64))
    x = torch.rand(2, 3, H, W, generator=gen(15), dtype=F64)
    assert torch.allclose(full.init(full.A(x)), x, atol=1e-12)
    ref = torch.fft.ifft2(torch.fft.ifftshift(torch.complex(y[:, :1], y[:, 1:]), dim=(-2, -1)), norm="ortho").real
    assert torch.allclose(op.init(y), ref, atol=1e-12)


# ---- (e) CT -----------------------------------------------------------------------------------
def _centred_coords(n):
    c = torch.arange(n, dtype=F64) - (n - 1) / 2
    return torch.meshgrid(c, c, indexing="ij")  # rows, columns


def test_ct_projects_a_gaussian_like_the_analytic_radon_transform():
    N, sigma, cx, cy = 33, 3.0, 5.0, -3.0
    op = CT.parallel_beam(N, n_angles=16)
    rows, cols = _centred_coords(N)
    x = torch.exp(-((cols - cx) ** 2 + (rows - cy) ** 2) / (2 * sigma**2))[None, None]
    sino = op.A(x)[0, 0]
    theta = op.angles[0]
    s = torch.arange(op.detector_size, dtype=F64) - (op.detector_size - 1) / 2
    centre = cx * torch.cos(theta)[:, None] + cy * torch.sin(theta)[:, None]
    ref = math.sqrt(2 * math.pi) * sigma * torch.exp(-(s[None] - centre) ** 2 / (2 * sigma**2))
    assert ((sino - ref).norm() / ref.norm()).item() < 0.02


def test_ct_disc_is_rotation_invariant_and_fbp_recovers_a_smooth_phantom():
    N = 32
    op = CT.parallel_beam(N)
    assert op.n_angles == round(200 * N / 362) and op.detector_size == math.ceil(N * math.sqrt(2))
    assert torch.allclose(op.angles[0], torch.arange(op.n_angles, dtype=F64) * math.pi / op.n_angles)
    rows, cols = _centred_coords(N)
    r = (rows**2 + cols**2).sqrt()
    disc = ((N / 3 - r) / 3).clamp(0, 1)[None, None]
    sino = op.A(disc)[0, 0]
    assert ((sino - sino.mean(0)).abs().max() / sino.max()).item() < 0.02
    phantom = (torch.exp(-((cols - 4) ** 2 + (rows + 3) ** 2) / 32) +
               0.5 * torch.exp(-((cols + 6) ** 2 + (rows - 5) ** 2) / 12.5))[None, None]
    y = op.A(phantom)
    rec = op.fbp(y)
    assert ((rec - phantom).norm() / phantom.norm()).item() < 0.05
    # the adjoint alone is far from the image scale: FBP's filter and pi / n_angles are what fix it
    assert ((op.A_adjoint(y) - phantom).norm() / phantom.norm()).item() > 1
    assert torch.equal(CT.parallel_beam(N, init_mode="fbp").init(y), rec)
    assert torch.equal(op.init(y), op.A_adjoint(y))
    assert CT.parallel_beam(16).n_angles == 9 and CT.parallel_beam(4).n_angles == 8


def test_ct_sparse_matrix_equals_the_grid_sample_kernels():
    """The sparse matrix built from the bilinear weights and grid_sample's own interpolation (and its backward, the
    scatter) give the same A and A^T: on random angles, a non-square image and a detector narrower than the image."""
    x = torch.rand(3, 2, 10, 13, generator=gen(15), dtype=F64)
    for make in (lambda **k: CT(torch.rand(6, generator=gen(14)) * 6.3, (10, 13), detector_size=11, **k),
                 lambda **k: CT.parallel_beam(24, n_angles=13, **k)):
        sparse, kernels = make(), make(matrix_nnz=0)
        xi = x if sparse.image_size == (10, 13) else torch.rand(2, 1, 24, 24, generator=gen(13), dtype=F64)
        assert sparse._matrices(F64, "cpu") is not None and kernels._matrices(F64, "cpu") is None
        y = kernels.A(xi)
        assert torch.allclose(sparse.A(xi), y, atol=1e-12)
        assert torch.allclose(sparse.A_adjoint(y), kernels.A_adjoint(y), atol=1e-12)
    # too many weights for the bound: the kernels
    assert CT.parallel_beam(24, n_angles=13, matrix_nnz=1000)._matrices(F64, "cpu") is None


def test_ct_chunking_does_not_change_the_result():
    x = torch.rand(2, 2, 10, 12, generator=gen(16), dtype=F64)
    whole = CT.parallel_beam((10, 12), n_angles=9, matrix_nnz=0)
    chunked = CT.parallel_beam((10, 12), n_angles=9, max_elements=1, matrix_nnz=0)
    assert len(chunked._chunks(4)) == 9
    y = whole.A(x)
    assert torch.allclose(chunked.A(x), y, atol=1e-12)
    assert torch.allclose(chunked.A_adjoint(y), whole.A_adjoint(y), atol=1e-12)


# ---- differentiability (gradcheck) --------------------------------------------------------------
GRAD_CASES = [
    ("ct", lambda: CT.parallel_beam(5, n_angles=3), (1, 1, 5, 5)),
    ("inpaint", lambda: Inpainting.random((2, 1, 4, 5), 0.5, gen(17), dtype=F64), (2, 1, 4, 5)),
    ("down", lambda: Downsampling(2), (1, 1, 4, 6)),
    ("mri", lambda: MRI.random((2, 1, 4, 5), 4, generator=gen(18), dtype=F64), (2, 1, 4, 5)),
]


@pytest.mark.parametrize("name,make,shape", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_operators_are_differentiable(name, make, shape):
    op = make()
    x = torch.randn(shape, generator=gen(19), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(op.A, (x,))
    y = op.A(x).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(op.A_adjoint, (y,))
    assert torch.autograd.gradgradcheck(op.A, (x,))


# ---- (f) Downsampling specifics ------------------------------------------------------------------
def test_bicubic_filter_is_matlabs_imresize_kernel():
    # MATLAB imresize(x, 1/2, 'bicubic') weights: -0.01171875 -0.03515625 0.11328125 0.43359375 (mirrored)
    half = torch.tensor([-0.01171875, -0.03515625, 0.11328125, 0.43359375], dtype=F64)
    w = Downsampling(2).filter[0]
    assert torch.allclose(w, torch.outer(torch.cat([half, half.flip(0)]), torch.cat([half, half.flip(0)])).to(w))
    # away from the border (where PyTorch renormalises and we wrap around) the operator is
    # PyTorch's antialiased bicubic resize, for even and odd factors alike
    g = gen(20)
    for f in (2, 3, 4):
        x = torch.randn(2, 3, 8 * f, 8 * f, generator=g, dtype=F64)
        ref = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(Downsampling(f).A(x)[..., 3:-3, 3:-3], ref[..., 3:-3, 3:-3], atol=1e-12), f


@pytest.mark.parametrize("f", [2, 3, 4])
@pytest.mark.parametrize("filt", ["bicubic", "gaussian"])
def test_downsampling_constants_init_and_size_errors(f, filt):
    op = Downsampling(f, filt)
    assert op.filter.sum().item() == pytest.approx(1.0, abs=1e-12)
    c = torch.full((2, 3, 6 * f, 5 * f), 0.7, dtype=F64)
    y = op.A(c)
    assert y.shape == (2, 3, 6, 5) and torch.allclose(y, torch.full_like(y, 0.7), atol=1e-12)
    for mode in ("bilinear", "bicubic"):
        x0 = Downsampling(f, filt, init_mode=mode).init(y)
        assert x0.shape == c.shape and torch.allclose(x0, c, atol=1e-12)
    with pytest.raises(ValueError, match=f"not divisible by the factor {f}"):
        op.A(torch.zeros(1, 1, 6 * f + 1, 6 * f))
    with pytest.raises(ValueError, match=f"factor {f}"):
        op.lambda_max((1, 1, 6 * f, 6 * f - 1))


def test_downsampling_bad_arguments():
    with pytest.raises(ValueError, match="filter"):
        Downsampling(2, "box")
    with pytest.raises(ValueError, match="factor"):
        Downsampling(0)


# ---- Measurement.subset keeps shared parameters and indexes per-sample ones ---------------------
def test_subset_indexes_only_per_sample_parameters():
    B = 8
    x = torch.rand(B, 1, 8, 8, generator=gen(21), dtype=F64)
    keep = torch.tensor([True, False] * 4)
    # CT with as many angles as samples: the angles are shared and must survive subset()
    for op in (Inpainting.random(x.shape, 0.5, gen(22), dtype=F64),
               MRI.random(x.shape, 4, generator=gen(23), dtype=F64),
               Downsampling(2), CT.parallel_beam(8, n_angles=B)):
        meas = Measurement(y=op.A(x), physics=op, sigma=torch.zeros(B, dtype=F64), x_shape=x.shape)
        sub = meas.subset(keep)
        assert torch.allclose(sub.A(x[keep]), meas.y[keep], atol=1e-12), type(op).__name__
        assert sub.lambda_max().shape == (4,)


# ---- (g) CUDA agrees with CPU ------------------------------------------------------------------
CUDA_CASES = [
    ("inpaint", lambda: Inpainting.random((2, 3, 16, 16), 0.5, gen(24), dtype=F64), (2, 3, 16, 16)),
    ("down", lambda: Downsampling(4), (2, 3, 16, 16)),
    ("mri", lambda: MRI.random((2, 1, 16, 16), 4, generator=gen(25), dtype=F64), (2, 1, 16, 16)),
    ("ct", lambda: CT.parallel_beam(16), (2, 1, 16, 16)),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,make,shape", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_matches_cpu(name, make, shape):
    # float64 on both devices, so any gap is a device bug rather than float32 rounding
    cpu = make()
    gpu = make().to("cuda")
    x = torch.rand(shape, generator=gen(26), dtype=F64)
    y = cpu.A(x)
    close = dict(rtol=1e-9, atol=1e-10)
    assert torch.allclose(gpu.A(x.cuda()).cpu(), y, **close)
    assert torch.allclose(gpu.A_adjoint(y.cuda()).cpu(), cpu.A_adjoint(y), **close)
    assert torch.allclose(gpu.init(y.cuda()).cpu(), cpu.init(y), **close)
    rho = torch.tensor([0.1, 1.0], dtype=F64)
    kw = dict(n_iter=500, tol=1e-12) if name == "ct" else {}
    assert torch.allclose(gpu.prox_data(x.cuda(), rho.cuda(), y.cuda(), **kw).cpu(), cpu.prox_data(x, rho, y, **kw),
                          rtol=1e-7, atol=1e-8)
    lam_gpu = gpu.lambda_max(shape, F64, "cuda")
    assert lam_gpu.device.type == "cuda"
    assert torch.allclose(lam_gpu.cpu(), cpu.lambda_max(shape, F64), rtol=1e-6)
    assert gpu.A_adjoint(gpu.A(x.cuda().requires_grad_(True))).sum().backward() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_masks_drawn_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    inp = Inpainting.random((2, 3, 8, 8), torch.tensor([0.2, 0.7], device="cuda"), g, device="cuda")
    mri = MRI.random((2, 1, 8, 16), 4, generator=g, device="cuda")
    assert inp.mask.device.type == "cuda" and mri.mask.device.type == "cuda"
    assert int(mri.mask.sum()) == 2 * round(16 / 4)
