"""GrAPE oracles: unbiased forward gradients, feedback alignment that rises, DFA weight updates."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from helpers import assert_dfa_hand_gradients, tanh_mlp, train_steps


def test_forward_gradient_estimates_are_unbiased():
    torch.manual_seed(0)
    model = tanh_mlp((5, 6, 6, 3))
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    true = list(bio_ext.input_gradients(model, x, y).values())  # inputs of layers 2 and 4
    conv = bio_ext.convert(model, "grape", options={"feedback_lr": 0.0, "keep_estimate": True})
    layers = [conv[2], conv[4]]
    sums = [torch.zeros_like(t) for t in true]
    draws = 3000
    for _ in range(draws):
        F.cross_entropy(conv(x), y).backward()
        for s, layer in zip(sums, layers):
            s += layer.forward_gradient.reshape(s.shape)
    for s, t in zip(sums, true):
        cos = F.cosine_similarity((s / draws).reshape(-1), t.reshape(-1), dim=0)
        assert cos > 0.95, cos
    # a single draw is far from the gradient (so the test measures the average, not a copy)
    single = layers[0].forward_gradient.reshape(true[0].shape)
    assert F.cosine_similarity(single.reshape(-1), true[0].reshape(-1), dim=0) < 0.9


def _estimate_errors(directions, draws, distribution="normal"):
    """Squared distance of single-step estimates (with ``directions`` tangents) to the true gradient,
    and the mean estimate, on a fixed batch."""
    torch.manual_seed(0)
    model = tanh_mlp((5, 6, 6, 3))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    true = list(bio_ext.input_gradients(model, x, y).values())[0]
    conv = bio_ext.convert(model, "grape", options={"feedback_lr": 0.0, "keep_estimate": True,
                                                     "directions": directions, "distribution": distribution})
    total, errs = torch.zeros_like(true), []
    for _ in range(draws):
        F.cross_entropy(conv(x), y).backward()
        g = conv[2].forward_gradient.reshape(true.shape)
        total += g
        errs.append(((g - true) ** 2).sum())
    return torch.stack(errs).mean(), total / draws, true


def test_more_tangent_directions_stay_unbiased_and_cut_the_variance():
    err1, _, _ = _estimate_errors(1, 400)
    err4, mean4, true = _estimate_errors(4, 400)
    assert F.cosine_similarity(mean4.reshape(-1), true.reshape(-1), dim=0) > 0.95
    # independent directions: the mean squared error of one step falls as 1/K (here about 0.25)
    assert 0.15 < (err4 / err1).item() < 0.4, (err4 / err1).item()


def test_rademacher_perturbations_are_signs_unbiased_and_less_noisy_than_normals():
    err_normal, _, _ = _estimate_errors(1, 400)
    err_signs, mean_signs, true = _estimate_errors(1, 1000, "rademacher")
    assert F.cosine_similarity(mean_signs.reshape(-1), true.reshape(-1), dim=0) > 0.95
    assert err_signs < err_normal  # no fourth-moment term: u_i^2 = 1
    conv = bio_ext.convert(tanh_mlp((5, 6, 6, 3)), "grape", options={"keep_estimate": True, "feedback_lr": 0.0,
                                                                     "distribution": "rademacher"})
    x = torch.randn(4, 5, dtype=torch.float64)
    F.cross_entropy(conv(x), torch.tensor([0, 1, 2, 0])).backward()
    g = conv[2].forward_gradient.reshape(4, -1)  # d_n u_n: with signs, every entry of a row has |d_n|
    assert torch.allclose(g.abs(), g.abs()[:, :1].expand_as(g)) and (g.abs() > 0).all()
    with pytest.raises(errors.ConfigError, match="distribution"):
        bio_ext.convert(tanh_mlp((5, 6, 3)), "grape", options={"distribution": "uniform"})


def test_extra_directions_leave_batchnorm_stats_rng_and_dropout_masks_as_one_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 8),
                          nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    conv = bio_ext.convert(model, "grape", options={"directions": 3, "feedback_lr": 0.0}, seed=0)
    seen = []
    conv[4].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    torch.manual_seed(5)
    out = conv(x)
    F.cross_entropy(out, y).backward()
    after = torch.rand(3)
    # the same forward without bio_ext: one draw seeds the perturbation generator, then the dropout mask
    torch.manual_seed(5)
    torch.randint(0, 2 ** 62, (1,))
    ref = model(x)
    assert len(seen) == 3  # the forward and two tangent-only replays
    for s in seen[1:]:
        assert torch.equal(s, seen[0])  # replays saw the same dropout mask
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(conv[1].running_mean, model[1].running_mean)  # one BatchNorm update, not three
    assert torch.equal(conv[1].num_batches_tracked, model[1].num_batches_tracked)
    assert torch.equal(after, torch.rand(3))  # the user's random stream continues as after one forward


def _directions_run(model, reuse: bool, monkeypatch, steps=2):
    """Feedback and weight gradients after ``steps`` GrAPE steps with 3 directions, with the replays reusing the
    forward's Linear/Conv2d products (``reuse``) or recomputing them; and how many products each step ran."""
    import sys
    from bio_ext.modes.base import FeedbackRule
    from bio_ext.modes.grape import GradientAlignedProjectedError as Grape
    if not reuse:
        monkeypatch.setattr(Grape, "primal_output", FeedbackRule.primal_output)
    calls = []
    for mod, fn in (("bio_ext.layers.linear", "LinearDirectFn"), ("bio_ext.layers.conv2d", "Conv2dDirectFn")):
        cls = getattr(sys.modules[mod], fn)
        monkeypatch.setattr(cls, "apply", (lambda apply: lambda *a: calls.append(1) or apply(*a))(cls.apply))
    conv = bio_ext.convert(model, "grape", options={"directions": 3, "feedback_lr": 0.2, "momentum": 0.0}, seed=0)
    torch.manual_seed(3)
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    for step in range(steps):
        if step == 1:
            calls.clear()  # the first forward also probes the output's size
        conv.zero_grad()
        F.cross_entropy(conv(x), y).backward()
    monkeypatch.undo()
    return conv, len(calls) // (steps - 1)


def test_extra_directions_reuse_the_forwards_products_and_change_nothing(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                          nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(),
                          nn.Linear(8, 3)).double()
    reused, n_reused = _directions_run(model, True, monkeypatch)
    computed, n_computed = _directions_run(model, False, monkeypatch)
    assert n_computed == 3 * n_reused == 3 * 4  # the replays ran no product of their own
    for a, b in zip(reused.modules(), computed.modules()):
        for name in ("feedback", "weight", "bias"):
            ta, tb = getattr(a, name, None), getattr(b, name, None)
            if isinstance(ta, torch.Tensor):
                assert torch.equal(ta, tb), (a, name)
                if isinstance(ta, nn.Parameter):
                    assert torch.equal(ta.grad, tb.grad), (a, name)
    # the feedback turned in both steps at every layer past the first (whose input is the data), so equal
    # feedback means equal estimates
    assert [int(m.feedback_steps) for m in reused.modules() if hasattr(m, "feedback_steps")] == [0, 2, 2, 2]


def _alignment_run(model, make_batch, mode, steps=300):
    """Mean alignment of the hidden layers' injected signal before and after ``steps`` steps."""
    conv = bio_ext.convert(model, mode, seed=0)
    opt = torch.optim.SGD(conv.parameters(), lr=0.0)  # weights frozen: only the feedback learns
    first = bio_ext.alignment(conv, *make_batch())
    for _ in range(steps):
        x, y = make_batch()
        opt.zero_grad()
        F.cross_entropy(conv(x), y).backward()
        opt.step()
    last = bio_ext.alignment(conv, *make_batch())
    return ([a.cosine for a in first.values() if a.cosine is not None],
            [a.cosine for a in last.values() if a.cosine is not None])


def _teacher_batches(in_shape, batch=256):
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(in_shape).prod()), 10))

    def make():
        x = torch.randn(batch, *in_shape)
        with torch.no_grad():
            return x, teacher(x).argmax(1)

    return make


@pytest.mark.parametrize("mode", ["grape", "dfa"])
def test_feedback_aligns_with_true_gradient_only_under_grape_mlp(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    first, last = _alignment_run(model, _teacher_batches((100,)), mode)
    assert abs(sum(first) / len(first)) < 0.1, first
    if mode == "grape":
        assert sum(last) / len(last) >= 0.3, last
    else:
        assert abs(sum(last) / len(last)) < 0.1, last


@pytest.mark.parametrize("mode", ["grape", "dfa"])
def test_feedback_aligns_with_true_gradient_only_under_grape_convnet(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                          nn.Tanh(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64), nn.Tanh(), nn.Linear(64, 10))
    first, last = _alignment_run(model, _teacher_batches((1, 16, 16)), mode)
    assert abs(sum(first) / len(first)) < 0.1, first
    if mode == "grape":
        assert sum(last) / len(last) >= 0.3, last
    else:
        assert abs(sum(last) / len(last)) < 0.1, last


def test_hidden_weight_gradients_equal_dfa_formula_with_current_feedback():
    model = tanh_mlp((6, 7, 5, 4))
    conv = bio_ext.convert(model, "grape")
    l1, l2, l3 = conv[0], conv[2], conv[4]
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    before = l2.feedback.clone()
    F.cross_entropy(conv(x), y).backward()
    assert not torch.allclose(before, l2.feedback)  # the feedback was turned in this step
    torch.testing.assert_close(l2.feedback.norm(), before.norm())  # ... with its norm kept
    assert_dfa_hand_gradients((l1, l2, l3), x, y)  # with the feedback as updated in this step


def test_grape_outputs_equal_plain_model_outputs():
    model = tanh_mlp((6, 7, 4), dtype=torch.float32)
    x = torch.randn(3, 6)
    assert torch.allclose(bio_ext.convert(model, "grape")(x), model(x))


def test_resnet18_trains_a_few_steps_under_grape():
    torchvision = pytest.importorskip("torchvision")
    model = bio_ext.convert(torchvision.models.resnet18(num_classes=10), "grape")
    losses = train_steps(model, torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]), steps=3, lr=0.01)
    assert all(torch.isfinite(torch.tensor(losses)))
    cos = [m.grape_cos for _, m in bio_ext.feedback_layers(model) if hasattr(m, "grape_cos")]
    assert len(cos) == 20 and all(torch.isfinite(c) for c in cos)  # every layer but conv1


def test_gpt2_trains_under_grape():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = bio_ext.convert(transformers.GPT2LMHeadModel(cfg), "grape")
    ids = torch.randint(0, 50, (4, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_model_with_nothing_to_perturb_is_a_clear_error():
    with pytest.raises(errors.NothingToConvertError, match="nothing to perturb"):
        bio_ext.convert(nn.Sequential(nn.Linear(4, 3), nn.Softmax(-1)), "grape")


def test_grape_options_are_validated_together():
    with pytest.raises(errors.ConfigError) as exc:
        bio_ext.convert(tanh_mlp(), "grape", options={"feedback_lr": -1, "momentum": 1.5, "directions": 0,
                                                      "perturbation": "weights", "lr": 3})
    assert len(exc.value.problems) == 5
    with pytest.raises(errors.ConfigError, match="takes no options"):
        bio_ext.convert(tanh_mlp(), "dfa", options={"feedback_lr": 0.1})


def test_feedback_rate_decays_with_a_step_count_kept_in_the_state_dict():
    model = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "grape", options={"feedback_lr_halflife": 2})
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    for _ in range(4):
        F.cross_entropy(model(x), y).backward()
    assert int(model[2].feedback_steps) == 4 and "2.feedback_steps" in model.state_dict()
    assert int(model[0].feedback_steps) == 0  # the first layer is never perturbed
    fresh = bio_ext.convert(tanh_mlp((6, 7, 5, 4)), "grape")
    fresh.load_state_dict(model.state_dict())
    assert int(fresh[2].feedback_steps) == 4
    with pytest.raises(errors.ConfigError, match="halflife"):
        bio_ext.convert(tanh_mlp(), "grape", options={"feedback_lr_halflife": 0})
