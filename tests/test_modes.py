"""Mode rules (bio_ext/modes.py): DRTP against its hand formula, and its refusals."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from helpers import assert_dfa_hand_gradients, drtp_signal, tanh_mlp, train_steps


def _drtp_mlp():
    conv = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "drtp", seed=0)
    return conv, (conv[0], conv[2], conv[4])


def test_drtp_hidden_gradients_project_the_true_target_not_the_error():
    conv, layers = _drtp_mlp()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    F.cross_entropy(conv(x), y).backward()
    assert_dfa_hand_gradients(layers, x, y, signal=drtp_signal)


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_drtp_hidden_gradients_do_not_depend_on_the_error_magnitude(scale):
    conv, layers = _drtp_mlp()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    (scale * F.cross_entropy(conv(x), y)).backward()
    # the output layer sees the scaled error, the hidden layers the same target projection as unscaled
    assert_dfa_hand_gradients(layers, x, y, signal=drtp_signal, loss_scale=scale)


def test_drtp_recovers_the_target_under_label_smoothing():
    """Label smoothing changes the error but not its argmin: hidden layers get the same target projection."""
    model = tanh_mlp((6, 7, 5, 4))
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    got = []
    for smoothing in (0.0, 0.2):
        conv = bio_ext.convert(model, "drtp", seed=0)
        F.cross_entropy(conv(x), y, label_smoothing=smoothing).backward()
        got.append({n: p.grad for n, p in conv.named_parameters()})
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        torch.testing.assert_close(got[0][name], got[1][name])
    assert not torch.allclose(got[0]["4.weight"], got[1]["4.weight"])  # the output layer sees the real error


def test_drtp_is_not_dfa():
    model = tanh_mlp((6, 7, 5, 4))
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    got = {}
    for mode in ("dfa", "drtp"):
        conv = bio_ext.convert(model, mode, seed=0)
        F.cross_entropy(conv(x), y).backward()
        got[mode] = conv[0].weight.grad
    assert not torch.allclose(got["dfa"], got["drtp"])


def test_drtp_trains_a_conv_net_and_lowers_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    conv = bio_ext.convert(model, "drtp")
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    losses = train_steps(conv, x, y, steps=30, lr=0.1)
    assert losses[-1] < losses[0]


def test_drtp_refuses_the_error_at_the_head_input():
    with pytest.raises(errors.ConversionError, match="error_at='output'"):
        bio_ext.convert(tanh_mlp(), "drtp", error_at="head_input")


def test_drtp_refuses_a_loss_that_is_not_cross_entropy_with_the_fix():
    conv, _ = _drtp_mlp()
    x = torch.randn(8, 6, dtype=torch.float64)
    with pytest.raises(errors.FeedbackSignalError, match="mode 'dfa'"):
        conv(x).exp().sum().backward()  # error exp(z) > 0: rows with no negative entry
