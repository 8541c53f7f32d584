"""GrAPE under hostile inputs (issue 17): a non-finite batch leaves the feedback state untouched and is
counted, huge logits keep the feedback finite, and the per-backward stepping semantics."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext

STATE = ("feedback", "feedback_velocity", "feedback_norm", "feedback_steps")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _state(model):
    return {(n, k): getattr(layer, k).clone() for n, layer in bio_ext.feedback_layers(model) for k in STATE}


@pytest.mark.parametrize("poison", ["nan_input", "inf_loss_scale"])
def test_a_non_finite_batch_leaves_every_feedback_buffer_untouched_and_is_counted(poison):
    model = bio_ext.convert(_mlp(), "grape", seed=0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()  # one good step: velocity and step count are non-trivial
    before = _state(model)
    bad, scale = x.clone(), 1.0
    if poison == "nan_input":
        bad[3, 1] = float("nan")
    else:  # an overflowing loss scale (GradScaler's case): the error is inf/NaN, the forward finite
        scale = float("inf")
    (F.cross_entropy(model(bad), y) * scale).backward()  # a GradScaler-style loop now skips the optimizer step
    for key, value in _state(model).items():
        assert torch.equal(value, before[key]), key
    stepped = [layer for _, layer in bio_ext.feedback_layers(model) if int(layer.feedback_steps) > 0]
    assert stepped and all(int(layer.feedback_skips) == 1 for layer in stepped)
    F.cross_entropy(model(x), y).backward()  # and training goes on from the untouched state
    for _, layer in bio_ext.feedback_layers(model):
        assert torch.isfinite(layer.feedback).all()
    assert all(int(layer.feedback_skips) == 1 and int(layer.feedback_steps) == 2 for layer in stepped)


def test_logits_near_1e19_keep_grape_feedback_finite_as_dfa_does():
    """The estimate grows with the logits; the cosine's norms overflowed float32 (inf, then NaN)."""
    base = _mlp()
    with torch.no_grad():
        base[4].weight.mul_(4e19)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for mode in ("dfa", "grape"):
        model = bio_ext.convert(base, mode, seed=0)
        out = model(x)
        assert out.abs().max() > 5e18
        F.cross_entropy(out, y).backward()
        for name, layer in bio_ext.feedback_layers(model):
            assert torch.isfinite(layer.feedback).all(), (mode, name)
            if mode == "grape" and int(layer.feedback_steps):
                assert torch.isfinite(layer.grape_cos) and layer.grape_cos.abs() > 0, name
        for n, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), (mode, n)


def _watch_inputs(model):
    """Per converted layer (not the first), the gradient injected at its input, one entry per forward."""
    seen = {}
    for _, layer in bio_ext.feedback_layers(model)[1:]:
        def pre(m, args):
            slot = len(seen.setdefault(m, []))
            seen[m].append(None)
            args[0].register_hook(lambda g, m=m, slot=slot: seen[m].__setitem__(slot, g))
        layer.register_forward_pre_hook(pre)
    return seen


def test_two_forwards_then_one_backward_step_the_feedback_once_per_forward_later_forward_first():
    """The module docstring's statement: each forward's error steps the feedback in its own tap (the later
    forward's first), and that forward's hidden gradients use the feedback right after its own step."""
    model = bio_ext.convert(_mlp(), "grape", seed=0)
    seen = _watch_inputs(model)
    hidden = [layer for _, layer in bio_ext.feedback_layers(model)[1:]]
    x1, x2, y = torch.randn(16, 4), torch.randn(16, 4), torch.randint(0, 3, (16,))
    outs, snaps = [model(x1), model(x2)], {}
    for i, out in enumerate(outs):
        out.retain_grad()
        out.register_hook(lambda g, i=i: snaps.__setitem__(i, [(int(m.feedback_steps), m.feedback.clone())
                                                               for m in hidden]))
    (F.cross_entropy(outs[0], y) + F.cross_entropy(outs[1], y)).backward()
    assert [s for s, _ in snaps[1]] == [0, 0] and [s for s, _ in snaps[0]] == [1, 1]  # forward 2's tap first
    for k, layer in enumerate(hidden):
        assert int(layer.feedback_steps) == 2
        mid, final = snaps[0][k][1], layer.feedback
        assert not torch.equal(mid, final)
        torch.testing.assert_close(seen[layer][1], outs[1].grad @ mid)  # projected right after its own step
        torch.testing.assert_close(seen[layer][0], outs[0].grad @ final)


def test_backward_twice_with_retain_graph_steps_the_feedback_twice():
    model = bio_ext.convert(_mlp(), "grape", seed=0)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = F.cross_entropy(model(x), y)
    hidden = [layer for _, layer in bio_ext.feedback_layers(model)[1:]]
    loss.backward(retain_graph=True)
    first = [layer.feedback.clone() for layer in hidden]
    loss.backward()
    for layer, fb in zip(hidden, first):
        assert int(layer.feedback_steps) == 2 and not torch.equal(layer.feedback, fb)
