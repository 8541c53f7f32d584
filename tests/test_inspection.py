"""alignment()/input_gradients(): checked against cases whose answer is known by construction."""

import torch
import torch.nn as nn

import bio_ext
from helpers import tanh_mlp


def test_dfa_with_feedback_equal_to_transported_weights_aligns_the_last_hidden_layer_exactly():
    model = tanh_mlp((6, 7, 5, 4))
    conv = bio_ext.convert(model, "dfa")
    with torch.no_grad():
        conv[4].feedback.copy_(conv[4].weight)  # (4, 5): e @ W_L is backprop's gradient at its input
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    cos = bio_ext.alignment(conv, x, y)
    assert set(cos) == {"2", "4"}  # the first layer's input needs no gradient
    assert abs(cos["4"] - 1) < 1e-12
    assert cos["2"] < 0.9  # random feedback one layer further down


def test_bp_mode_and_fa_with_weights_are_perfectly_aligned():
    model = tanh_mlp((6, 7, 5, 4))
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    assert all(abs(c - 1) < 1e-12 for c in bio_ext.alignment(bio_ext.convert(model, "bp"), x, y).values())
    fa = bio_ext.convert(model, "fa")
    for _, layer in bio_ext.feedback_layers(fa):
        with torch.no_grad():
            layer.feedback.copy_(layer.weight)
    assert all(abs(c - 1) < 1e-12 for c in bio_ext.alignment(fa, x, y).values())


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
