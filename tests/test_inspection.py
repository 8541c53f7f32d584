"""alignment()/input_gradients(): checked against cases whose answer is known by construction."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn

import bio_ext
from helpers import tanh_mlp


def test_dfa_with_feedback_equal_to_transported_weights_aligns_the_last_hidden_layer_exactly():
    model = tanh_mlp((6, 7, 5, 4))
    conv = bio_ext.convert(model, "dfa")
    with torch.no_grad():
        conv[4].feedback.copy_(conv[4].weight)  # (4, 5): e @ W_L is backprop's gradient at its input
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    al = bio_ext.alignment(conv, x, y)
    assert set(al) == {"0", "2", "4"}
    assert al["0"].signal is None and al["0"].cosine is None  # the first layer's input needs no gradient
    assert abs(al["4"].cosine - 1) < 1e-12 and al["4"].signal < 1e-4
    # the last hidden layer then trains on backprop's exact weight gradient: update angle 0
    assert al["2"].update < 1e-4
    assert al["2"].cosine < 0.9 and al["0"].update > 1  # random feedback one layer further down


def test_bp_mode_and_fa_with_weights_are_perfectly_aligned():
    model = tanh_mlp((6, 7, 5, 4))
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    for a in bio_ext.alignment(bio_ext.convert(model, "bp"), x, y).values():
        assert a.update < 1e-4 and a.feedback < 1e-4 and abs(a.norm_ratio - 1) < 1e-12
        assert a.cosine is None or abs(a.cosine - 1) < 1e-12
    fa = bio_ext.convert(model, "fa")
    for _, layer in bio_ext.feedback_layers(fa):
        with torch.no_grad():
            layer.feedback.copy_(layer.weight)
    for a in bio_ext.alignment(fa, x, y).values():
        assert a.update < 1e-4 and a.feedback < 1e-4
        assert a.cosine is None or abs(a.cosine - 1) < 1e-12


def test_alignment_leaves_the_model_untouched():
    conv = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "grape")
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    bio_ext.alignment(conv, torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,)))
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in conv.parameters())


def test_input_gradients_of_a_plain_model_are_backprop_through_each_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    grads = bio_ext.input_gradients(model, x, y)
    h = torch.tanh(model[0](x)).detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(model[2](h), y).backward()
    torch.testing.assert_close(grads["2"], h.grad)


@pytest.mark.parametrize("factor, angle, ratio", [(2.0, 0.0, 2.0), (-0.5, 180.0, 0.5)])
def test_feedback_angle_and_norm_ratio_follow_the_feedback_given(factor, angle, ratio):
    fa = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "fa")
    for _, layer in bio_ext.feedback_layers(fa):
        with torch.no_grad():
            layer.feedback.copy_(factor * layer.weight)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    for a in bio_ext.alignment(fa, x, y).values():
        assert abs(a.feedback - angle) < 1e-4 and abs(a.norm_ratio - ratio) < 1e-12
        assert a.estimate is None


def test_update_angle_is_the_angle_between_the_mode_gradient_and_autograd():
    model = tanh_mlp((6, 7, 5, 4))
    dfa = bio_ext.convert(model, "dfa", seed=3)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    al = bio_ext.alignment(dfa, x, y)
    probe = copy.deepcopy(dfa)
    torch.nn.functional.cross_entropy(probe(x), y).backward()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name in ("0", "2"):
        g, t = probe.get_submodule(name).weight.grad, model.get_submodule(name).weight.grad
        expected = math.degrees(math.acos(float(F.cosine_similarity(g.reshape(-1), t.reshape(-1), dim=0))))
        assert abs(al[name].update - expected) < 1e-6
    assert al["0"].feedback is None and al["0"].norm_ratio is None  # direct feedback is not weight-shaped


def test_grape_reports_its_estimate_and_alignment_consumes_no_randomness():
    torch.manual_seed(0)
    conv = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "grape", seed=0)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    before = torch.get_rng_state()
    al = bio_ext.alignment(conv, x, y)
    assert torch.equal(before, torch.get_rng_state())
    assert al["0"].estimate is None and 0 <= al["2"].estimate <= 180 and 0 <= al["4"].estimate <= 180


@pytest.mark.parametrize("mode", ["grape", "brsf"])
def test_training_with_and_without_alignment_calls_ends_with_identical_weights(mode):
    def train(probe):
        torch.manual_seed(1)
        conv = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), mode, seed=0)
        opt = torch.optim.SGD(conv.parameters(), lr=0.1)
        for _ in range(4):
            x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
            if probe:
                bio_ext.alignment(conv, x, y)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(conv(x), y).backward()
            opt.step()
        return conv.state_dict()

    a, b = train(False), train(True)
    assert all(torch.equal(a[k], b[k]) for k in a)
