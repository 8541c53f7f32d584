"""Oracle tests of the feedback Functions: FA with feedback = weights is autograd,
DFA gradients equal the formula computed by hand, conv geometry over a table."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from helpers import assert_dfa_hand_gradients, grads, set_feedback_to_weights, tanh_mlp

LOCAL_MODES = ["fa", "usf", "brsf", "frsf"]

CONV_CASES = [  # (kwargs of nn.Conv2d, input size)
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding=1),  # depthwise
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same"),  # asymmetric 'same'
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="valid"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="circular", stride=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=2, out_channels=3, kernel_size=1, stride=3),
]


def _conv_net(kwargs, out_dim=4):
    conv = nn.Conv2d(**kwargs)
    return nn.Sequential(nn.Conv2d(2, kwargs["in_channels"], 1), nn.Tanh(), conv, nn.Tanh(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(kwargs["out_channels"] * 4, out_dim)
                         ).double()


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    loss.backward()
    return grads(model), x.grad


# ----------------------------------------------------------------------------- FA oracle
@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 6), (2, 2, 3, 6)], ids=["2d", "3d", "4d"])
def test_fa_linear_with_feedback_equal_to_weights_matches_autograd(shape):
    model = tanh_mlp()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 4, shape[:-1])
    ref_g, ref_x = _backward(model, x, y)
    conv = bio_ext.convert(model, "fa")
    set_feedback_to_weights(conv)
    got_g, got_x = _backward(conv, x, y)
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_fa_conv2d_with_feedback_equal_to_weights_matches_autograd(kwargs):
    model = _conv_net(kwargs)
    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (3,))
    ref_g, ref_x = _backward(model, x, y)
    conv = bio_ext.convert(model, "fa")
    set_feedback_to_weights(conv)
    got_g, got_x = _backward(conv, x, y)
    assert got_g.keys() == ref_g.keys()
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-10, atol=1e-12)


def test_fa_input_gradient_is_grad_output_times_feedback():
    torch.manual_seed(1)
    lin = nn.Linear(6, 3).double()
    conv = bio_ext.convert(lin, "fa")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64)
    conv(x).backward(g)
    torch.testing.assert_close(x.grad, g @ conv.feedback)
    torch.testing.assert_close(conv.weight.grad, g.t() @ x.detach())
    torch.testing.assert_close(conv.bias.grad, g.sum(0))
    assert not torch.allclose(conv.feedback, conv.weight)


@pytest.mark.parametrize("kwargs", CONV_CASES[:5], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_fa_conv_input_gradient_is_transposed_conv_with_feedback(kwargs):
    conv = nn.Conv2d(**kwargs).double()
    fl = bio_ext.convert(conv, "fa")
    x = torch.randn(2, kwargs["in_channels"], 9, 8, dtype=torch.float64, requires_grad=True)
    out = fl(x)
    g = torch.randn_like(out)
    out.backward(g)
    expect = torch.nn.grad.conv2d_input(x.shape, fl.feedback, g, fl.stride, fl.padding, fl.dilation, fl.groups)
    torch.testing.assert_close(x.grad, expect)


# ----------------------------------------------------------------------------- bp identical
@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_bp_mode_gradients_identical_to_autograd(kwargs):
    model = _conv_net(kwargs).float()
    x = torch.randn(3, 2, 9, 8)
    y = torch.randint(0, 4, (3,))
    ref_g, ref_x = _backward(model, x, y)
    got_g, got_x = _backward(bio_ext.convert(model, "bp"), x, y)
    for k in ref_g:
        assert torch.equal(got_g[k], ref_g[k]), k
    assert torch.equal(got_x, ref_x)


# ----------------------------------------------------------------------------- DFA by hand
def test_dfa_tanh_mlp_weight_gradients_equal_hand_formula():
    model = tanh_mlp((6, 7, 5, 4))
    conv = bio_ext.convert(model, "dfa")
    l1, l2, l3 = conv[0], conv[2], conv[4]
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    F.cross_entropy(conv(x), y).backward()
    assert_dfa_hand_gradients((l1, l2, l3), x, y)
    assert l2.feedback.shape == (4, 7) and l3.feedback.shape == (4, 5) and l1.feedback.shape == (4, 6)
    # and it is not backprop
    ref = tanh_mlp((6, 7, 5, 4))
    ref.load_state_dict(model.state_dict())
    F.cross_entropy(ref(x), y).backward()
    assert not torch.allclose(ref[0].weight.grad, l1.weight.grad)


def test_dfa_linear_on_sequence_outputs_uses_per_token_errors():
    model = tanh_mlp((6, 7, 4))
    conv = bio_ext.convert(model, "dfa")
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 3))
    out = conv(x)
    F.cross_entropy(out.reshape(-1, 4), y.reshape(-1)).backward()
    l1, l2 = conv[0], conv[2]
    with torch.no_grad():
        h1 = torch.tanh(x @ l1.weight.t() + l1.bias)
        a2 = h1 @ l2.weight.t() + l2.bias
        e = (torch.softmax(a2, -1) - F.one_hot(y, 4)) / 6
        d1 = (e @ l2.feedback) * (1 - h1 ** 2)
    torch.testing.assert_close(l1.weight.grad, d1.reshape(-1, 7).t() @ x.reshape(-1, 6))


@pytest.mark.parametrize("conv_error", ["norm", "mean", "sum"])
@pytest.mark.parametrize("kwargs", CONV_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_dfa_conv_input_gradient_is_kernel_feedback_on_broadcast_error(kwargs, conv_error):
    """The documented semantics: conv_transpose of e spread over the output grid with the
    (output_dim, C, kh, kw) feedback as kernel, scaled by 1/sqrt(H_out W_out) ('norm', the default),
    1/(H_out W_out) ('mean') or 1 ('sum')."""
    model = nn.Sequential(nn.Conv2d(**kwargs), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(kwargs["out_channels"], 4)).double()
    conv = bio_ext.convert(model, "dfa", conv_error=conv_error, radial="keep")  # the projection as it is
    c = conv[0]
    x = torch.randn(3, kwargs["in_channels"], 9, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3,))
    out = conv(x)
    F.cross_entropy(out, y).backward()
    with torch.no_grad():
        e = (torch.softmax(out, 1) - F.one_hot(y, 4)) / 3
        xp = x
        if c._pad is not None:
            xp = F.pad(x, c._pad, mode=c._pad_mode)
        ref_out = F.conv2d(xp, c.weight, None, c.stride, c._conv_pad, c.dilation, c.groups)
        ho, wo = ref_out.shape[-2:]
        grid = e[:, :, None, None].expand(3, 4, ho, wo)
        grid = grid * {"norm": (ho * wo) ** -0.5, "mean": 1 / (ho * wo), "sum": 1.0}[conv_error]
        gxp = torch.nn.grad.conv2d_input(xp.shape, c.feedback, grid, c.stride, c._conv_pad, c.dilation, 1)
    if c._pad is None:
        torch.testing.assert_close(x.grad, gxp)
    else:  # the padding's own adjoint then maps it back onto x
        xp2 = x.detach().clone().requires_grad_(True)
        F.pad(xp2, c._pad, mode=c._pad_mode).backward(gxp)
        torch.testing.assert_close(x.grad, xp2.grad)
    assert c.feedback.shape == (4, kwargs["in_channels"], *c.kernel_size)


def test_dfa_hidden_conv_weight_gradient_uses_projected_error():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double()
    conv = bio_ext.convert(model, "dfa")
    c1, c2 = conv[0], conv[2]
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (2,))
    out = conv(x)
    F.cross_entropy(out, y).backward()
    with torch.no_grad():
        e = (torch.softmax(out, 1) - F.one_hot(y, 5)) / 2
        a1 = F.conv2d(x, c1.weight, c1.bias, padding=1)
        grid = e[:, :, None, None].expand(2, 5, 6, 6) / 6  # default 'norm': 1/sqrt(6*6)
        delta1 = torch.nn.grad.conv2d_input(a1.shape, c2.feedback, grid, 1, 1) * (1 - torch.tanh(a1) ** 2)
        expect = torch.nn.grad.conv2d_weight(x, c1.weight.shape, delta1, padding=1)
    torch.testing.assert_close(c1.weight.grad, expect)


# ----------------------------------------------------------------------------- sign-symmetry family
def test_usf_feedback_is_scaled_sign_of_weight():
    lin = nn.Linear(6, 4).double()
    fl = bio_ext.convert(lin, "usf")
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64)
    fl(x).backward(g)
    s = 1 / (3 * 6) ** 0.5  # std of PyTorch's default init, fan_in = 6
    torch.testing.assert_close(fl.feedback, torch.sign(fl.weight) * s)
    torch.testing.assert_close(x.grad, g @ (torch.sign(fl.weight) * s))


def test_frsf_feedback_is_fixed_magnitude_times_sign_and_follows_weight_sign():
    lin = nn.Linear(6, 4).double()
    fl = bio_ext.convert(lin, "frsf")
    mag = fl.feedback_magnitude.clone()
    fl(torch.randn(2, 6, dtype=torch.float64))
    torch.testing.assert_close(fl.feedback, mag * torch.sign(fl.weight))
    with torch.no_grad():
        fl.weight.neg_()
    fl(torch.randn(2, 6, dtype=torch.float64))
    torch.testing.assert_close(fl.feedback, mag * torch.sign(fl.weight))
    assert torch.equal(fl.feedback_magnitude, mag) and (mag >= 0).all()


def test_brsf_magnitude_is_redrawn_every_batch_with_sign_of_weight():
    lin = nn.Linear(16, 8)
    fl = bio_ext.convert(lin, "brsf")
    fl(torch.randn(2, 16))
    first = fl.feedback.clone()
    fl(torch.randn(2, 16))
    assert torch.equal(torch.sign(fl.feedback), torch.sign(fl.weight.detach()))
    assert torch.equal(torch.sign(first), torch.sign(fl.feedback))
    assert not torch.allclose(first.abs(), fl.feedback.abs())


@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_local_modes_use_their_feedback_for_input_gradients(mode):
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    fl = bio_ext.convert(conv, mode)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    out = fl(x)
    g = torch.randn_like(out)
    out.backward(g)
    expect = torch.nn.grad.conv2d_input(x.shape, fl.feedback, g, 1, 1)
    torch.testing.assert_close(x.grad, expect)
