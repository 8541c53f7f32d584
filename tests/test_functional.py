"""bio_ext.functional: the pure maths, against autograd and torch's own ops."""

import pytest
import torch
import torch.nn.functional as F

from bio_ext.errors import FeedbackSignalError
from bio_ext.functional import (coverage_matrix, fit_rows, linear_param_grads, project_flat, spread_projection,
                                targets_from_error)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_param_grads_equal_autograd(transposed):
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=False)
    w = torch.randn(4, 3, dtype=torch.float64) if transposed else torch.randn(3, 4, dtype=torch.float64)
    w.requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = (x @ w + b) if transposed else F.linear(x, w, b)
    g = torch.randn_like(y)
    y.backward(g)
    gw, gb = linear_param_grads(g, x, True, True, transposed)
    torch.testing.assert_close(gw, w.grad)
    torch.testing.assert_close(gb, b.grad)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_spread_projection_equals_the_transposed_conv_of_the_broadcast_error(stride, padding, dilation):
    n, d, c, k, h = 2, 3, 2, 3, 7
    e = torch.randn(n, d, dtype=torch.float64)
    fb = torch.randn(d, c, k, k, dtype=torch.float64)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    my = coverage_matrix(h, ho, k, stride, padding, dilation, dtype=torch.float64)
    out = spread_projection(project_flat(e, fb), (c, k, k, my, my, 1.0))
    # the oracle: error e_n broadcast over the output grid, convolved back with the kernel-shaped feedback
    grid = e[:, :, None, None].expand(n, d, ho, ho)
    ref = torch.nn.grad.conv2d_input((n, c, h, h), fb, grid, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(out, ref)


def test_fit_rows_is_exact_per_row_and_spreads_evenly_over_positions():
    p = torch.randn(4, 3)
    torch.testing.assert_close(fit_rows(p, torch.Size([2, 2, 3]), "x"), p.reshape(2, 2, 3))
    spread = fit_rows(p, torch.Size([4, 5, 3]), "x")
    torch.testing.assert_close(spread.sum(1), p)
    with pytest.raises(FeedbackSignalError, match="rows"):
        fit_rows(p, torch.Size([3, 3]), "x")


def test_targets_come_back_from_a_cross_entropy_error_and_other_losses_are_refused():
    z = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    (e,) = torch.autograd.grad(F.cross_entropy(z, y), z)
    assert torch.equal(targets_from_error(e, "t", "fix"), y)
    assert targets_from_error(torch.zeros(1, 4), "t", "fix").tolist() == [-100]
    with pytest.raises(FeedbackSignalError, match="fix"):
        targets_from_error(torch.ones(2, 4), "t", "fix")


# --------------------------------------------------------------------------- GrAPE's cosine in closed form


def _grape_layer(shape):
    """A converted layer (the second of a small model) in float64, a (padded) input it sees and what it
    registers; ``shape`` is "linear", "tokens" (a Linear on 3 positions per example) or a conv feedback shape
    ("kernel", "kernel_strided": stride 2, padding 1, dilation 2, "dense", "factored")."""
    import torch.nn as nn

    import bio_ext
    torch.manual_seed(0)
    n = 5
    if shape in ("linear", "tokens"):
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        conv = bio_ext.convert(model, "grape", seed=0)
        x = torch.randn(n, 3, 6, dtype=torch.float64) if shape == "tokens" else torch.randn(n, 6, dtype=torch.float64)
        return conv[2], x.requires_grad_(True), None
    geom = {"stride": 2, "padding": 1, "dilation": 2} if shape == "kernel_strided" else {}
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3, **geom), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 2, 9, 9))
    conv_feedback = "kernel" if shape.startswith("kernel") else shape
    conv = bio_ext.convert(model.double(), "grape", seed=0, conv_feedback=conv_feedback, input_shape=(2, 9, 9))
    layer = conv[2]
    x = torch.randn(n, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    return layer, x, layer.projection_info(x)


@pytest.mark.parametrize("shape", ["linear", "tokens", "kernel", "kernel_strided", "dense", "factored"])
@pytest.mark.parametrize("weighted", [True, False], ids=["d_u", "formed"])
def test_grape_closed_form_cosine_and_gradient_equal_autograd_in_float64(shape, weighted):
    """GrAPE's step differentiates the mini-batch cosine between ``P = project_error(e, B)`` and the estimate
    ``R = diag(d) u`` in closed form (bio_ext.functional.cosine_statistics): it equals autograd through the
    layer's own projection, for a Linear and every Conv2d feedback shape (kernel: also strided, padded,
    dilated), with the estimate as its factors (``d``, ``u``) or formed, and with several positions per
    example (tokens: their sum is compared)."""
    from bio_ext.modes.grape import cosine_gradient, projection_kind
    layer, x, info = _grape_layer(shape)
    assert projection_kind(layer, info) == {"linear": "flat", "tokens": "flat", "dense": "flat"}.get(
        shape, "factored" if shape == "factored" else "kernel")
    n = x.shape[0]
    e = torch.randn(n, 3, dtype=torch.float64) * 1e-3
    u = torch.randn(n, x[0].numel(), dtype=torch.float64)
    d = torch.randn(n, dtype=torch.float64) * 1e4
    b = layer.feedback.detach().clone().requires_grad_(True)
    p = layer.project_error(e, b, info).reshape(n, -1)
    r = (u * d[:, None]).reshape(n, -1, p.shape[1]).sum(1)
    cos = (p * r).sum() / (p.norm() * r.norm())
    (grad,) = torch.autograd.grad(cos, b)
    got_cos, got_grad, ok, compared = cosine_gradient(layer, e, u, info, d) if weighted else \
        cosine_gradient(layer, e, u * d[:, None], info)
    torch.testing.assert_close(got_cos, cos.detach(), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got_grad, grad, rtol=1e-9, atol=1e-12)
    assert bool(ok) and got_grad.shape == layer.feedback.shape
    torch.testing.assert_close(compared * d[:, None] if weighted else compared, r)


@pytest.mark.parametrize("poison", ["e_nan", "e_inf", "d_nan", "d_inf", "u_nan", "u_inf"])
def test_grape_closed_form_flags_any_non_finite_input(poison):
    """One check of the closed form's gradient and cosine catches a NaN or inf anywhere in its inputs."""
    from bio_ext.modes.grape import cosine_gradient
    for shape in ("linear", "kernel", "factored"):
        layer, x, info = _grape_layer(shape)
        n = x.shape[0]
        e, u, d = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, x[0].numel(), dtype=torch.float64), \
            torch.randn(n, dtype=torch.float64)
        t = {"e": e, "d": d, "u": u}[poison[0]]
        t.view(-1)[1] = float(poison.split("_")[1])
        assert not bool(cosine_gradient(layer, e, u, info, d)[2]), (shape, poison)
        assert not bool(cosine_gradient(layer, e, u * d[:, None], info)[2]), (shape, poison)


def test_large_cpu_normal_draws_split_over_two_generators_stay_standard_normal_and_reproducible():
    """GrAPE's perturbations (bio_ext._utils.rng.normal): a large CPU draw takes its first half from the first
    generator (as torch.randn would) and its second half from the second, in a worker thread; the same seeds
    give the same draws, and the two halves are independent standard normals."""
    from bio_ext._utils import rng

    def draw(shape):
        return rng.normal(shape, torch.float32, "cpu", torch.Generator().manual_seed(3),
                          torch.Generator().manual_seed(rng.derived_seed(3)))
    shape = (300, 1000)
    a, b = draw(shape), draw(shape)
    assert torch.equal(a, b)
    flat, half = a.reshape(-1), a.numel() // 2
    assert torch.equal(flat[:half], torch.randn(half, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(flat[:half], flat[half:])
    threads = torch.get_num_threads()
    try:  # the draws do not depend on the number of torch threads (a seeded run must not change with it)
        torch.set_num_threads(1)
        assert torch.equal(draw(shape), a)
    finally:
        torch.set_num_threads(threads)
    for part in (flat[:half], flat[half:]):
        assert abs(part.mean().item()) < 0.01 and abs(part.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([flat[:half], flat[half:]]))[0, 1].item()) < 0.01
    small = draw((10, 10))  # below the threshold: torch.randn from the first generator
    assert torch.equal(small, torch.randn(10, 10, generator=torch.Generator().manual_seed(3)))
