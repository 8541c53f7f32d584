"""GrAPE's ``feedback_target="jacobian"`` (issue 12): the feedback is turned toward the output's Jacobian
estimated from the same single forward with tangents (the output tangent ``t = J u`` projected through
``B`` against the perturbation ``u``, ``E[t u^T] = J``) instead of toward the gradient estimate
``<e, t> u``. Checked: one step equals the rule by hand in float64 (Linear and Conv2d), ``t`` is the
true Jacobian-vector product of the perturbations, and with frozen weights the feedback aligns faster
than with the gradient target."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.errors import BioExtError
from bio_ext.modes.grape import GradientAlignedProjectedError as Rule

from test_grape_oracles import HALF, LR, MOM, _cnn, _mlp, _project

OPTS = {"feedback_lr": LR, "momentum": MOM, "feedback_lr_halflife": HALF, "feedback_target": "jacobian"}


def _record(monkeypatch):
    """Keep every perturbation the rule draws and the output tangent it keeps."""
    seen = {"u": {}, "t": None}
    perturb, on_output = Rule.perturb, Rule.on_output

    def rec_perturb(self, session, slot, x):
        out = perturb(self, session, slot, x)
        seen["u"][slot] = session.rule_state.perturbations[slot]
        return out

    def rec_output(self, session, output):
        out = on_output(self, session, output)
        seen["t"] = session.rule_state.out_tangent
        return out

    monkeypatch.setattr(Rule, "perturb", rec_perturb)
    monkeypatch.setattr(Rule, "on_output", rec_output)
    return seen


@pytest.mark.parametrize("build, shape", [(_mlp, (8, 5)), (_cnn, (6, 1, 7, 7))], ids=["linear", "conv2d"])
def test_one_jacobian_step_equals_the_hand_computed_rule(monkeypatch, build, shape):
    torch.manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    plain = build()
    model = bio_ext.convert(plain, "grape", seed=0, options=OPTS)
    layers = [m for _, m in bio_ext.feedback_layers(model) if m is not model[0]]
    for layer in layers:
        if hasattr(layer, "kernel_size"):
            layer.register_forward_hook(lambda m, a, out: setattr(m, "hw_out", out.shape[-2:]))
    before = {layer: (layer.feedback.detach().clone(), layer.feedback.norm().item()) for layer in layers}
    seen = _record(monkeypatch)
    F.cross_entropy(model(x), y).backward()
    t = seen["t"]
    assert sorted(seen["u"]) == list(range(len(layers)))  # one slot per layer after the first
    for slot, layer in enumerate(layers):
        b, norm0 = before[layer]
        u = seen["u"][slot].reshape(len(x), -1)
        bb = b.clone().requires_grad_(True)
        p = _project(layer, t, bb).reshape(-1)
        cos = (p @ u.reshape(-1)) / (p.norm() * u.norm())
        (grad,) = torch.autograd.grad(cos, bb)
        v = (1 - MOM) * grad
        stepped = b + LR * norm0 ** 2 * v
        torch.testing.assert_close(layer.grape_cos, cos.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.feedback, stepped * (norm0 / stepped.norm()), rtol=1e-9, atol=1e-12)


def test_the_output_tangent_is_the_jacobian_vector_product_of_the_perturbations(monkeypatch):
    """Linear model, so the output tangent must equal sum_l W_L...W_{l} u_l exactly (by hand)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)).double()
    model = bio_ext.convert(plain, "grape", seed=0, options=OPTS)
    seen = _record(monkeypatch)
    x = torch.randn(7, 4, dtype=torch.float64)
    F.cross_entropy(model(x), torch.randint(0, 3, (7,))).backward()
    w1, w2 = plain[1].weight.detach(), plain[2].weight.detach()
    expect = seen["u"][0] @ w1.t() @ w2.t() + seen["u"][1] @ w2.t()
    torch.testing.assert_close(seen["t"], expect, rtol=1e-10, atol=1e-12)


def _align(target, steps=150, batch=128):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    torch.manual_seed(1)
    teacher = nn.Linear(50, 10)

    def make():
        x = torch.randn(batch, 50)
        with torch.no_grad():
            return x, teacher(x).argmax(1)

    conv = bio_ext.convert(model, "grape", seed=0, options={"feedback_target": target})
    for _ in range(steps):  # no optimizer: weights frozen, only the feedback moves
        x, y = make()
        F.cross_entropy(conv(x), y).backward()
    cos = [v.cosine for v in bio_ext.alignment(conv, *make()).values() if v.cosine is not None]
    return sum(cos) / len(cos)


def test_frozen_weights_the_jacobian_target_aligns_faster_than_the_gradient_target():
    grad, jac = _align("gradient"), _align("jacobian")
    assert jac > 0.5 and jac > grad + 0.15, (grad, jac)


def test_an_unknown_feedback_target_is_refused_with_the_valid_values():
    with pytest.raises(BioExtError, match="feedback_target.*'gradient' or 'jacobian'"):
        bio_ext.convert(_mlp(), "grape", options={"feedback_target": "hessian"})
