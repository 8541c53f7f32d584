"""PEPITA's weight mirroring (Srinivasan et al. 2023; ``pepita`` with ``weight_mirroring: true``).

Every expected value is computed here by hand from the definitions in :mod:`bio_ext.modes.pepita`:

* one backward equals, on a 3-layer MLP in float64: the initial rescaling of the mirror matrices to
  ``std(F) = 0.05 sqrt(2 / K) scale``, the two-pass updates on ``x - err @ (B_1 B_2 B_3)^T``, then the mirror step
  ``B <- (1 - lr decay) B + lr xi^T (xi W^T) / N`` on the noise the global generator draws, then the rescaling;
* the schedule (warm-up steps only mirror and leave ``.grad`` alone; then a mirror step every ``mirror_for`` of
  ``mirror_every`` calls);
* with frozen forward weights, mirroring turns every ``B_l`` towards ``W_l^T`` and ``F`` towards the transposed
  product of the weights (cosine > 0.9), and the hidden updates it then gives point downhill;
* mirroring off is pepita as before (the two-pass oracle, no new buffers, the random stream untouched);
* bad options are refused with their paths; a state_dict round trip keeps the matrices and the step count.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.errors import ConfigError
from helpers import assert_same_backward, feedback_layers_of, float64_batch, relu_mlp

MIRROR = {"weight_mirroring": True}


mlp, linears, batch = relu_mlp, feedback_layers_of, float64_batch


def cos(a, b):
    a, b = a.detach().flatten(), b.detach().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def lin(layer, h):
    out = h @ layer.weight.t()
    return out + layer.bias if layer.bias is not None else out


def two_passes(model, x, y, modulation):
    """PEPITA's updates of a Linear-ReLU-Linear-ReLU-Linear MLP (mean-reduced loss) with the first layer's input
    modulated by ``modulation(err)``."""
    l1, l2, l3 = linears(model)
    with torch.no_grad():
        n = len(y)
        h1 = torch.relu(lin(l1, x))
        h2 = torch.relu(lin(l2, h1))
        out = lin(l3, h2)
        err = torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(x.dtype)
        x_mod = x + modulation(err)
        h1m = torch.relu(lin(l1, x_mod))
        h2m = torch.relu(lin(l2, h1m))
        d1, d2, e = (h1 - h1m) / n, (h2 - h2m) / n, err / n
        return [d1.t() @ x_mod, d1.sum(0), d2.t() @ h1m, d2.sum(0), e.t() @ h2m, e.sum(0)]


def rescaled(bs, target):
    p = bs[0] @ bs[1] @ bs[2]
    f = (target / p.std()) ** (1 / 3)
    return [b * f for b in bs]


# --------------------------------------------------------------------------- the step by hand


@pytest.mark.parametrize("normalize", [True, False])
def test_one_backward_equals_the_mirror_formula_by_hand(normalize):
    lr, decay, amp, scale = 0.3, 0.2, 0.5, 2.0
    model = bio_ext.convert(mlp(), "pepita", seed=3, scale=scale,
                            options={**MIRROR, "mirror_lr": lr, "mirror_decay": decay, "mirror_noise": amp,
                                     "mirror_normalize": normalize})
    layers = linears(model)
    assert [tuple(l.mirror.shape) for l in layers] == [(6, 9), (9, 7), (7, 4)]  # W_l^T's shapes
    raw = [l.mirror.clone() for l in layers]
    x, y = batch()
    out = model(x)
    state = torch.get_rng_state()
    F.cross_entropy(out, y).backward()

    target = 0.05 * (2 / 6) ** 0.5 * scale
    bs = rescaled(raw, target)  # the first backward first sets std(F) to the target
    fm = bs[0] @ bs[1] @ bs[2]  # K x D
    want = two_passes(model, x, y, lambda err: -err @ fm.t())
    got = [g for l in layers for g in (l.weight.grad, l.bias.grad)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert want[0].abs().max() > 1e-6

    torch.set_rng_state(state)  # the mirror step's noise comes next from the global generator
    new = []
    for layer, b in zip(layers, bs):
        xi = amp * torch.randn(len(y), b.shape[0], dtype=torch.float64)
        xi = xi - xi.mean()
        new.append((1 - lr * decay) * b + lr * xi.t() @ (xi @ layer.weight.detach().t()) / len(y))
    if normalize:
        new = rescaled(new, target)
        torch.testing.assert_close((new[0] @ new[1] @ new[2]).std(), torch.tensor(target, dtype=torch.float64))
    for layer, b in zip(layers, new):
        torch.testing.assert_close(layer.mirror, b)
        assert int(layer.mirror_steps) == 1


def test_the_schedule_warms_up_then_mirrors_every_third_call():
    model = bio_ext.convert(mlp(), "pepita", seed=0,
                            options={**MIRROR, "mirror_warmup": 2, "mirror_every": 3, "mirror_for": 1})
    layers = linears(model)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    moved, updated = [], []
    for t in range(7):
        model.zero_grad(set_to_none=True)
        b = [l.mirror.clone() for l in layers]
        F.cross_entropy(model(x), y).backward()
        moved.append(not all(torch.equal(l.mirror, c) for l, c in zip(layers, b)))
        updated.append(all(p.grad is not None for p in model.parameters()))
        if t < 2:
            assert all(p.grad is None for p in model.parameters())  # warm-up: mirror only
    assert moved == [True, True, True, False, False, True, False]  # t < 2, then t % 3 == 2
    assert updated == [False, False, True, True, True, True, True]
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)  # no optimizer here: the weights themselves never move
    assert [int(l.mirror_steps) for l in layers] == [7, 7, 7]


# --------------------------------------------------------------------------- what it learns


def test_mirroring_with_frozen_weights_aligns_every_B_with_W_transposed_and_F_with_the_product():
    torch.manual_seed(1)
    model = bio_ext.convert(mlp(sizes=(12, 16, 14, 5), act=nn.Tanh), "pepita", seed=1,
                            options={**MIRROR, "mirror_lr": 1.0, "mirror_decay": 0.1, "mirror_noise": 0.2,
                                     "mirror_warmup": 10 ** 6})
    layers = linears(model)
    x, y = torch.randn(32, 12, dtype=torch.float64), torch.randint(0, 5, (32,))
    start = [cos(l.mirror, l.weight.t()) for l in layers]
    assert max(abs(c) for c in start) < 0.5
    for _ in range(100):
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # frozen: warm-up steps only mirror
    got = [cos(l.mirror, l.weight.t()) for l in layers]
    assert min(got) > 0.9, got
    w1, w2, w3 = (l.weight for l in layers)
    fm = layers[0].mirror @ layers[1].mirror @ layers[2].mirror
    assert cos(fm, (w3 @ w2 @ w1).t()) > 0.9


def test_the_mirrored_F_gives_hidden_updates_that_point_downhill():
    torch.manual_seed(0)
    net = mlp(sizes=(20, 30, 25, 5), act=nn.Tanh)
    x, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    bp = [m.weight.grad for m in ref if isinstance(m, nn.Linear)]
    mirrored = bio_ext.convert(copy.deepcopy(net), "pepita", seed=0,
                               options={**MIRROR, "mirror_lr": 1.0, "mirror_noise": 0.3, "mirror_warmup": 40})
    for _ in range(41):
        mirrored.zero_grad()
        F.cross_entropy(mirrored(x), y).backward()
    hidden = [cos(l.weight.grad, g) for l, g in zip(linears(mirrored), bp)][:2]
    assert min(hidden) > 0.3, hidden  # x - F e with F ~ the weights' transposed product: descent


# --------------------------------------------------------------------------- off, options, checkpoints


def test_mirroring_off_is_pepita_as_before():
    x, y = batch()
    plain = bio_ext.convert(mlp(), "pepita", seed=3)
    off = bio_ext.convert(mlp(), "pepita", seed=3, options={"weight_mirroring": False})
    off.load_state_dict(plain.state_dict())
    assert off.state_dict().keys() == plain.state_dict().keys()
    assert not any("mirror" in k for k in off.state_dict())
    for model in (plain, off):
        out = model(x)
        state = torch.get_rng_state()
        F.cross_entropy(out, y).backward()
        assert torch.equal(torch.get_rng_state(), state)
        fb = linears(model)[0].feedback
        want = two_passes(model, x, y, lambda err: err @ fb)  # the fixed random F, x + err @ F
        got = [g for l in linears(model) for g in (l.weight.grad, l.bias.grad)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("options,paths", [
    ({"weight_mirroring": "yes"}, ["options.weight_mirroring"]),
    ({"mirror_lr": 0.1}, ["options.mirror_lr"]),  # without weight_mirroring: refused, not ignored
    ({"weight_mirroring": False, "mirror_noise": 0.2}, ["options.mirror_noise"]),
    ({**MIRROR, "mirror_lr": -1.0}, ["options.mirror_lr"]),
    ({**MIRROR, "mirror_decay": float("nan")}, ["options.mirror_decay"]),
    ({**MIRROR, "mirror_noise": 0.0}, ["options.mirror_noise"]),
    ({**MIRROR, "mirror_warmup": 1.5}, ["options.mirror_warmup"]),
    ({**MIRROR, "mirror_every": 0}, ["options.mirror_every"]),
    ({**MIRROR, "mirror_every": 2, "mirror_for": 3}, ["options.mirror_for"]),
    ({**MIRROR, "mirror_normalize": 1}, ["options.mirror_normalize"]),
    ({**MIRROR, "mirror_steps": 3}, ["options.mirror_steps"]),
])
def test_bad_mirroring_options_are_refused_with_their_paths(options, paths):
    with pytest.raises(ConfigError) as info:
        bio_ext.convert(mlp(), "pepita", options=options)
    assert [p.path for p in info.value.problems] == paths


def test_state_dict_round_trip_keeps_the_mirror_matrices_and_the_schedule():
    x, y = batch()
    opts = {**MIRROR, "mirror_lr": 0.5, "mirror_every": 2}
    a = bio_ext.convert(mlp(), "pepita", seed=0, options=opts)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt.step()
    b = bio_ext.convert(mlp(), "pepita", seed=99, options=opts)
    assert not torch.equal(linears(a)[0].mirror, linears(b)[0].mirror)
    b.load_state_dict(a.state_dict())
    for la, lb in zip(linears(a), linears(b)):
        assert torch.equal(la.mirror, lb.mirror) and int(lb.mirror_steps) == 3
    assert_same_backward(a, b, x, y)
    for la, lb in zip(linears(a), linears(b)):
        torch.testing.assert_close(la.mirror, lb.mirror)  # step 3 mirrored in both (3 % 2 >= 1)
