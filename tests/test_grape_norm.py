"""GrAPE's BatchNorm tangent (bio_ext/modes/grape_norm.py, issue 16): the few fused passes give the tangent that
torch's forward AD gives, for BatchNorm1d/2d, affine or not, with batch or running statistics, and a GrAPE
forward through a network with BatchNorm carries the same output tangent with the hooks as without them."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.modes import grape_norm
from helpers import grape_output_tangents


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm2d, (6, 3, 5, 5)), (nn.BatchNorm1d, (7, 4)),
                                        (nn.BatchNorm1d, (5, 4, 3))], ids=["2d", "1d", "1d_length"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_tangent_equals_torchs_forward_ad(cls, shape, affine, training):
    torch.manual_seed(0)
    m = cls(shape[1], affine=affine).double().train(training)
    with torch.no_grad():
        m.running_var.uniform_(0.5, 2)
        if affine:
            m.weight.uniform_(0.5, 2)
            m.bias.uniform_()
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    t = torch.randn_like(x)
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent
    torch.testing.assert_close(grape_norm.batch_norm_tangent(m, x, t), ref, rtol=1e-12, atol=1e-12)


def _hooks_off(monkeypatch):
    monkeypatch.setattr(grape_norm, "_active", lambda module: False)


def test_a_grape_forward_through_batchnorm_carries_torchs_output_tangent(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    x, y = torch.randn(8, 2, 7, 7, dtype=torch.float64), torch.randint(0, 3, (8,))
    calls, fused = [], grape_norm.batch_norm_tangent
    monkeypatch.setattr(grape_norm, "batch_norm_tangent", lambda *a: calls.append(1) or fused(*a))
    tangents = grape_output_tangents(monkeypatch, net, x, y, _hooks_off)
    # the hook ran at the second BatchNorm (the first one's input, after the first layer, carries no tangent)
    assert len(calls) == 1 and tangents[0].abs().max() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


def test_the_statistics_the_forward_saved_give_the_same_tangent():
    torch.manual_seed(1)
    m = nn.BatchNorm2d(3).double()
    x = (torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 3).requires_grad_(True)
    t = torch.randn_like(x)
    stats = grape_norm._saved_stats(m(x))
    assert stats is not None
    torch.testing.assert_close(grape_norm.batch_norm_tangent(m, x, t, stats), grape_norm.batch_norm_tangent(m, x, t),
                               rtol=1e-10, atol=1e-12)


def test_revert_takes_the_batchnorm_hooks_off():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    model = bio_ext.convert(net, "grape", seed=0)
    F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    assert model[3]._forward_hooks and model[3]._forward_pre_hooks
    plain = bio_ext.revert(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())


# ----------------------------------------------------------------------------- the other plain-layer rules


def _rule_cases():
    cases = {"layernorm": (lambda: nn.LayerNorm(6), (3, 5, 6)),
             "layernorm_2d": (lambda: nn.LayerNorm((4, 6)), (3, 4, 6)),
             "layernorm_plain": (lambda: nn.LayerNorm(6, elementwise_affine=False), (2, 6)),
             "linear": (lambda: nn.Linear(6, 4), (3, 6)),
             "linear_no_bias": (lambda: nn.Linear(6, 4, bias=False), (2, 3, 6))}
    try:
        from transformers.activations import FastGELUActivation, NewGELUActivation
        from transformers.pytorch_utils import Conv1D
        cases.update({"conv1d": (lambda: Conv1D(4, 6), (2, 3, 6)), "new_gelu": (NewGELUActivation, (3, 6)),
                      "fast_gelu": (FastGELUActivation, (3, 6))})
    except ImportError:
        pass
    return cases


@pytest.mark.parametrize("case", list(_rule_cases()))
@pytest.mark.parametrize("with_graph", [True, False], ids=["graph", "no_graph"])
def test_every_plain_layer_rule_gives_torchs_forward_ad_tangent(case, with_graph):
    make, shape = _rule_cases()[case]
    torch.manual_seed(0)
    m = make().double()
    for p in m.parameters():
        nn.init.uniform_(p, 0.5, 1.5)
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.5).requires_grad_(with_graph)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        ref = fwAD.unpack_dual(m(fwAD.make_dual(x.detach(), t))).tangent
    rule = grape_norm.rule_for(m)
    assert rule is not None
    tol = 1e-9 if case == "fast_gelu" else 1e-12  # its constant 0.7978845608 is sqrt(2 / pi) to 10 digits
    torch.testing.assert_close(rule(m, x, t, m(x)), ref, rtol=tol, atol=tol)


def test_subclasses_keep_torchs_own_tangent():
    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    assert grape_norm.rule_for(Scaled(4)) is None and grape_norm.rule_for(nn.LayerNorm(4)) is not None


def test_a_grape_macro_forward_through_plain_blocks_carries_torchs_output_tangent(monkeypatch):
    """Linear, LayerNorm and GELU-free blocks left plain by macro granularity: the rules' output tangent is the one
    torch's formulas give (the hooks switched off)."""
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 6))  # noqa: E731
    net = nn.Sequential(block(), block(), nn.Linear(6, 3)).double()
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    calls, rule_for = [], grape_norm.rule_for
    monkeypatch.setattr(grape_norm, "rule_for", lambda m: calls.append(type(m)) or rule_for(m))
    tangents = grape_output_tangents(monkeypatch, net, x, y, _hooks_off, granularity="macro", points=["0", "1"])
    assert nn.LayerNorm in calls and nn.Linear in calls and tangents[0].abs().max() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)
