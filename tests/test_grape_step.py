"""GrAPE's feedback update (bio_ext/modes/grape_step.py): the layers of one backward stepped together
(``apply_steps``: foreach ops over the layers that share rates) equal the documented rule applied to each layer
alone, in float64, including a layer whose batch was not finite (left as it was, counted) beside layers that step."""

import pytest
import torch
import torch.nn as nn

import bio_ext
from bio_ext.modes.grape_step import apply_steps


def _layers(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 8), nn.Tanh(),
                          nn.Linear(8, 3)).to(dtype)
    model = bio_ext.convert(model, "grape", seed=0)
    return [m for _, m in bio_ext.feedback_layers(model)][1:]


def _rule(fb, v, t, norm0, grad, lr, mom, half):
    """One step of the rule in GrAPE's docstring: velocity, decayed rate, step, renormalisation."""
    v = mom * v + (1 - mom) * grad
    rate = lr if half is None else lr / (1 + t / half)
    stepped = fb + rate * norm0 ** 2 * v
    return stepped * (norm0 / stepped.norm()), v


@pytest.mark.parametrize("finite", [(True, True, True), (True, False, True)], ids=["all-finite", "one-skipped"])
def test_layers_stepped_together_equal_the_rule_applied_to_each_alone(finite):
    layers = _layers()
    with torch.no_grad():
        for i, layer in enumerate(layers):  # a history: different step counts and velocities per layer
            layer.feedback_steps.fill_(3 * i)
            layer.feedback_velocity.copy_(torch.randn_like(layer.feedback))
    # two option groups: the first two layers share rates, the third has its own (and no decay)
    opts = [(0.3, 0.9, 4.0), (0.3, 0.9, 4.0), (0.1, 0.5, None)]
    grads = [torch.randn_like(layer.feedback) for layer in layers]
    before = [(layer.feedback.clone(), layer.feedback_velocity.clone(), int(layer.feedback_steps)) for layer in layers]
    expected = [_rule(fb, v, t, layer.feedback_norm, g, *o)
                for layer, (fb, v, t), g, o in zip(layers, before, grads, opts)]
    apply_steps([(layer, g, torch.tensor(ok), *o) for layer, g, ok, o in zip(layers, grads, finite, opts)])
    for layer, ok, (fb, v, t), (fb_new, v_new) in zip(layers, finite, before, expected):
        torch.testing.assert_close(layer.feedback, fb_new if ok else fb, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.feedback_velocity, v_new if ok else v, rtol=1e-12, atol=1e-14)
        assert int(layer.feedback_steps) == t + ok
        assert int(layer.feedback_skips) == (not ok)
        if ok:
            torch.testing.assert_close(layer.feedback.norm(), layer.feedback_norm, rtol=1e-12, atol=0)


def test_a_non_finite_gradient_of_a_skipped_layer_reaches_no_buffer():
    """The selection is a ``where``, not a product: a NaN/inf gradient of a skipped layer leaves its buffers (and
    every other layer's) exactly as the rule says."""
    layers = _layers(torch.float32)
    grads = [torch.randn_like(layer.feedback) for layer in layers]
    grads[0][0, 0] = float("nan")
    grads[1][0, 0] = float("inf")
    before = [(layer.feedback.clone(), layer.feedback_velocity.clone()) for layer in layers]
    apply_steps([(layer, g, torch.tensor(i == 2), 0.05, 0.9, 500) for i, (layer, g) in enumerate(zip(layers, grads))])
    for i, (layer, (fb, v)) in enumerate(zip(layers, before)):
        assert torch.isfinite(layer.feedback).all() and torch.isfinite(layer.feedback_velocity).all()
        assert torch.equal(layer.feedback, fb) == (i != 2)
        assert int(layer.feedback_skips) == (i != 2)


def test_the_feedback_step_benchmark_times_one_feedback_update_per_training_step(monkeypatch):
    """benchmarks/grape_feedback_step.py wraps the method that runs the update: renamed or bypassed, it would time
    nothing (an empty list) and its table would be empty."""
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from grape_feedback_step import Grape, feedback_step_times
    original = Grape.before_projection
    times = feedback_step_times("mlp", steps=2, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert Grape.before_projection is original  # put back


def test_a_layer_with_several_steps_in_one_call_has_them_applied_in_order():
    """A layer called twice in one forward has two steps in one backward (and under DDP, in one all-reduced batch):
    the second sees the first's feedback and velocity, as two separate calls would."""
    together, alone = _layers(), _layers()
    grads = [torch.randn_like(together[0].feedback) for _ in range(3)]
    apply_steps([(together[0], g, torch.tensor(True), 0.3, 0.9, 4.0) for g in grads])
    for g in grads:
        apply_steps([(alone[0], g, torch.tensor(True), 0.3, 0.9, 4.0)])
    for name in ("feedback", "feedback_velocity", "feedback_steps"):
        torch.testing.assert_close(getattr(together[0], name), getattr(alone[0], name), rtol=1e-12, atol=1e-14)
    assert int(together[0].feedback_steps) == 3


class _Twice(nn.Module):
    """A hidden Linear called twice in each forward (weights shared across two depths)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))))


def test_grape_steps_a_layer_called_twice_from_its_updated_feedback(monkeypatch):
    """The steps of one backward wait to be applied together; a layer's second step must still be computed from the
    feedback its first step left, as when each step was applied at once (the reference: every step applied as soon
    as it is computed)."""
    from bio_ext.modes import grape_step

    def run():
        torch.manual_seed(0)
        model = bio_ext.convert(_Twice().double(), "grape", seed=0, options={"feedback_lr": 0.3})
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
        for _ in range(3):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        return model

    batched = run()
    monkeypatch.setattr(grape_step.PendingSteps, "append", lambda self, step: apply_steps([step]))
    immediate = run()
    assert int(batched.b.feedback_steps) == 6
    for name in ("feedback", "feedback_velocity", "feedback_steps"):
        torch.testing.assert_close(getattr(batched.b, name), getattr(immediate.b, name), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(batched.b.weight.grad, immediate.b.weight.grad, rtol=1e-12, atol=1e-14)
