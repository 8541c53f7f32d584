"""Exact oracles for GrAPE's feedback step (issue 17): the cosine, velocity, rate, new feedback and its
norm computed by hand in float64 for a Linear and a Conv2d layer, and a two-step run against a
hand-stepped reference (the second step sees the first's feedback, and the injected input gradient uses
the updated feedback, so a stale cached concatenation would show)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext

LR, MOM, HALF = 0.3, 0.9, 4.0
OPTS = {"feedback_lr": LR, "momentum": MOM, "feedback_lr_halflife": HALF, "keep_estimate": True}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 4)).double()


def _project(layer, e, b):
    """``P = e @ B`` at the layer's input, by an independent formula: for a Conv2d the transposed
    convolution of the error broadcast over the output grid, times 1/sqrt(H_out W_out)."""
    if isinstance(layer, nn.Linear) or b.dim() == 2:
        return e @ b
    ho, wo = layer.hw_out
    grid = e[:, :, None, None].expand(e.shape[0], e.shape[1], ho, wo) * (ho * wo) ** -0.5
    return F.conv_transpose2d(grid, b).reshape(e.shape[0], -1)


def _hand_step(layer, b, v, t, e, g, norm0):
    """One step of the documented rule, in float64: returns (cos, new B, new v)."""
    bb = b.clone().requires_grad_(True)
    p = _project(layer, e, bb).reshape(-1)
    cos = (p @ g.reshape(-1)) / (p.norm() * g.norm())
    (grad,) = torch.autograd.grad(cos, bb)
    v = MOM * v + (1 - MOM) * grad
    lr = LR / (1 + t / HALF)
    stepped = b + lr * norm0 ** 2 * v
    return cos.detach(), stepped * (norm0 / stepped.norm()), v


def _run(build, x, y, steps, edit=None, device="cpu"):
    model = bio_ext.convert(build(), "grape", seed=0, options=OPTS).to(device)
    x, y = x.to(device), y.to(device)
    layers = [m for _, m in bio_ext.feedback_layers(model) if m is not model[0]]
    for layer in layers:
        if isinstance(layer, nn.Module) and hasattr(layer, "kernel_size"):
            layer.register_forward_hook(lambda m, a, out: setattr(m, "hw_out", out.shape[-2:]))
    seen = {}
    for layer in layers:
        layer.register_forward_pre_hook(
            lambda m, a: [a[0].register_hook(lambda gr, m=m: seen.__setitem__(m, gr))] and None)
    ref = {layer: (layer.feedback.detach().clone(), torch.zeros_like(layer.feedback), layer.feedback.norm().item())
           for layer in layers}
    for t in range(steps):
        if edit is not None and t == 1:
            edit(layers, ref)
        out = model(x)
        out.retain_grad()
        F.cross_entropy(out, y).backward()
        e = out.grad
        for layer in layers:
            b, v, norm0 = ref[layer]
            cos, b, v = _hand_step(layer, b, v, t, e, layer.forward_gradient, norm0)
            ref[layer] = (b, v, norm0)
            torch.testing.assert_close(layer.grape_cos, cos, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.feedback_velocity, v, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.feedback, b, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(layer.feedback.norm().item(), norm0, rtol=1e-12, atol=0)
            assert int(layer.feedback_steps) == t + 1
            # DFA's input gradient is projected with the feedback after this step's update
            torch.testing.assert_close(seen[layer].reshape(len(x), -1), _project(layer, e, b), rtol=1e-9, atol=1e-12)
    return model


@pytest.mark.parametrize("build, shape", [(_mlp, (8, 5)), (_cnn, (6, 1, 7, 7))], ids=["linear", "conv2d"])
def test_one_grape_step_equals_the_hand_computed_rule(build, shape):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    _run(build, x, y, steps=1)


@pytest.mark.parametrize("build, shape", [(_mlp, (8, 5)), (_cnn, (6, 1, 7, 7))], ids=["linear", "conv2d"])
def test_two_grape_steps_equal_a_hand_stepped_reference(build, shape):
    torch.manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    _run(build, x, y, steps=2)


def test_the_feedback_is_renormalised_to_its_stored_initial_norm_not_its_current_one():
    """Between the steps the feedback is doubled (a user edit, or drift): the step brings its norm back to
    ``feedback_norm``, the norm it was built with (the docstring's ``||B_0||``)."""
    torch.manual_seed(3)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))

    def double(layers, ref):
        for layer in layers:
            with torch.no_grad():
                layer.feedback.mul_(2.0)
            b, v, norm0 = ref[layer]
            ref[layer] = (2.0 * b, v, norm0)

    _run(_mlp, x, y, steps=2, edit=double)
