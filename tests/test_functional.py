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
