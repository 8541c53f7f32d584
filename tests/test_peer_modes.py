"""Oracles for the modes GrAPE is compared with (issue 15): ``pepita``, ``dkp`` and ``fdfa``.

Every expected value is computed here by hand from the definitions in the modes' docstrings
(:mod:`bio_ext.modes.pepita`, :mod:`bio_ext.modes.dkp`, :mod:`bio_ext.modes.fdfa`), not with bio_ext's helpers:

* PEPITA: the weight and bias gradients after one ``loss.backward()`` equal the two-pass formula on a 3-layer MLP
  (the second pass written out here), for each reduction and with and without biases;
* DKP: the feedback after one step equals ``B - lr (e^T h + decay B)``, and that step's hidden gradients used the
  feedback from before the step;
* FDFA: with frozen weights the feedback converges to the true (batch-mean) Jacobian of the output with respect
  to each hidden layer's input (cosine > 0.95), its momentum average is bias-corrected as stated, and with the
  feedback set to an example's true Jacobian the hidden gradients equal backprop's;
* typed errors for bad options and unsupported layers; registration; state_dict round trips.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.errors import ConfigError, FeedbackSignalError, UnsupportedModuleError
from helpers import assert_same_backward, feedback_layers_of, float64_batch, relu_mlp

PEERS = ["pepita", "dkp", "fdfa"]


mlp, linears, batch = relu_mlp, feedback_layers_of, float64_batch


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("mode", PEERS)
def test_peer_modes_are_registered_direct_modes(mode):
    assert mode in bio_ext.available_modes()
    spec = bio_ext.modes.get_mode(mode)
    assert spec.family == "direct" and spec.description
    assert spec.rule.traceable is False  # per-layer work in enter/backward: never traced by torch.compile


# --------------------------------------------------------------------------- PEPITA


def pepita_by_hand(model, x, y, reduction):
    """The two passes of a Linear-ReLU-Linear-ReLU-Linear MLP, written out."""
    l1, l2, l3 = linears(model)

    def lin(layer, h):
        out = h @ layer.weight.t()
        return out + layer.bias if layer.bias is not None else out

    with torch.no_grad():
        n = len(y)
        h1 = torch.relu(lin(l1, x))
        h2 = torch.relu(lin(l2, h1))
        out = lin(l3, h2)
        err = torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(x.dtype)  # the papers' e
        x_mod = x + err @ l1.feedback  # F (D x K) of the first layer
        h1m = torch.relu(lin(l1, x_mod))
        h2m = torch.relu(lin(l2, h1m))
        scale = 1.0 / n if reduction == "mean" else 1.0
        e = err * scale  # dL/d(output)
        d1, d2 = (h1 - h1m) * scale, (h2 - h2m) * scale
        return {"W1": d1.t() @ x_mod, "b1": d1.sum(0), "W2": d2.t() @ h1m, "b2": d2.sum(0),
                "W3": e.t() @ h2m, "b3": e.sum(0)}


@pytest.mark.parametrize("reduction,bias,scale", [("mean", True, 1.0), ("sum", True, 1.0), ("mean", False, 1.0),
                                                   ("mean", True, 40.0)])
def test_pepita_gradients_equal_the_two_pass_formula(reduction, bias, scale):
    model = bio_ext.convert(mlp(bias=bias), "pepita", seed=3, scale=scale,
                            options={"error_reduction": reduction})
    x, y = batch()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    want = pepita_by_hand(model, x, y, reduction)
    l1, l2, l3 = linears(model)
    for i, layer in enumerate((l1, l2, l3), 1):
        torch.testing.assert_close(layer.weight.grad, want[f"W{i}"])
        if bias:
            torch.testing.assert_close(layer.bias.grad, want[f"b{i}"])
        else:
            assert layer.bias is None
    # the modulation is large enough here to matter: the hidden updates are not zero
    assert want["W1"].abs().max() > 1e-6


def test_pepita_F_has_the_reference_scale_and_the_updates_accumulate():
    model = bio_ext.convert(mlp(sizes=(6, 50, 50, 10)), "pepita", seed=0)
    bound = 0.05 * (6 / 10) ** 0.5
    fb = linears(model)[0].feedback
    assert fb.shape == (10, 6) and fb.abs().max() <= bound and fb.abs().max() > 0.8 * bound
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    once = [p.grad.clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    for g, p in zip(once, model.parameters()):
        torch.testing.assert_close(p.grad, 2 * g)


def test_pepita_second_pass_uses_the_same_dropout_masks_and_leaves_the_random_stream_as_one_forward():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Dropout(0.5), nn.Linear(9, 4)).double()
    model = bio_ext.convert(net, "pepita", seed=1)
    x, y = batch()
    model(x)  # the first-forward audit probe, out of the way
    state = torch.get_rng_state()
    out = model(x)
    after_forward = torch.get_rng_state()
    F.cross_entropy(out, y).backward()
    assert torch.equal(torch.get_rng_state(), after_forward)
    # by hand, with the first pass's mask (redrawn from the same state)
    torch.set_rng_state(state)
    l1, l2 = linears(model)
    with torch.no_grad():
        a1 = torch.relu(x @ l1.weight.t() + l1.bias)
        mask = F.dropout(torch.ones_like(a1), 0.5, training=True)
        h1 = a1 * mask
        o = h1 @ l2.weight.t() + l2.bias
        err = torch.softmax(o, 1) - F.one_hot(y, 4).double()
        x_mod = x + err @ l1.feedback
        h1m = torch.relu(x_mod @ l1.weight.t() + l1.bias) * mask
        d1 = (h1 - h1m) / len(y)
    torch.testing.assert_close(l1.weight.grad, d1.t() @ x_mod)
    torch.testing.assert_close(l2.weight.grad, (err / len(y)).t() @ h1m)


def test_pepita_restores_batchnorm_running_statistics_after_the_second_pass():
    net = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 4)).double()
    model = bio_ext.convert(net, "pepita")
    x, y = batch()
    out = model(x)
    stats = [b.clone() for b in model[1].buffers()]
    F.cross_entropy(out, y).backward()
    for a, b in zip(stats, model[1].buffers()):
        assert torch.equal(a, b)
    assert model[1].weight.grad is None  # PEPITA defines no update for it


def test_pepita_trains_an_mlp_through_the_unchanged_loop():
    torch.manual_seed(0)
    model = bio_ext.convert(mlp(sizes=(10, 32, 32, 3), act=nn.ReLU, dtype=torch.float32), "pepita")
    x = torch.randn(64, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]


class Doubling(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.cat([h, h], 1))


@pytest.mark.parametrize("build,exc,words", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)), UnsupportedModuleError,
     "no convolutional form"),
    (lambda: Doubling(), FeedbackSignalError, "next converted Linear's input"),
], ids=["conv2d", "not-a-chain"])
def test_pepita_refuses_what_it_has_no_form_for(build, exc, words):
    model = build()
    if exc is UnsupportedModuleError:
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(exc, match=words):
            bio_ext.convert(model, "pepita", inplace=True)
        assert not bio_ext.is_converted(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    conv = bio_ext.convert(model, "pepita")
    with pytest.raises(exc, match=words):
        F.cross_entropy(conv(torch.randn(5, 6)), torch.randint(0, 3, (5,))).backward()


def test_pepita_excluding_convolutions_converts_the_rest():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    model = bio_ext.convert(net, "pepita", exclude_types=[nn.Conv2d])
    assert [n for n, _ in bio_ext.feedback_layers(model)] == ["2"]


# --------------------------------------------------------------------------- DKP


@pytest.mark.parametrize("lr,decay", [(1e-3, 1e-6), (0.5, 0.0), (0.2, 0.3), (0.0, 0.1)])
def test_dkp_feedback_step_equals_its_formula_and_the_step_projects_the_old_feedback(lr, decay):
    model = bio_ext.convert(mlp(act=nn.Tanh), "dkp", seed=2, options={"feedback_lr": lr, "feedback_decay": decay})
    l1, l2, l3 = linears(model)
    x, y = batch()
    old = {i: layer.feedback.clone() for i, layer in enumerate((l2, l3), 2)}
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        h1 = torch.tanh(x @ l1.weight.t() + l1.bias)
        h2 = torch.tanh(h1 @ l2.weight.t() + l2.bias)
        out = h2 @ l3.weight.t() + l3.bias
        e = (torch.softmax(out, 1) - F.one_hot(y, 4).double()) / len(y)
    for i, h in ((2, h1), (3, h2)):
        want = old[i] - lr * (e.t() @ h + decay * old[i]) if lr else old[i]
        torch.testing.assert_close((l2, l3)[i - 2].feedback, want)
    # this step's hidden gradients: DFA's with the feedback as it was at the forward
    d1 = (e @ old[2]) * (1 - h1 ** 2)
    d2 = (e @ old[3]) * (1 - h2 ** 2)
    torch.testing.assert_close(l1.weight.grad, d1.t() @ x)
    torch.testing.assert_close(l2.weight.grad, d2.t() @ h1)
    torch.testing.assert_close(l3.weight.grad, e.t() @ h2)
    assert int(l2.feedback_steps) == (1 if lr else 0)


def test_dkp_output_layer_feedback_and_weight_converge_as_in_kolen_pollack():
    """The output layer's feedback is injected at its input h, so its update e^T h is exactly its weight's
    gradient: with SGD at the same rate and decay on both, B - W shrinks by (1 - lr decay) per step."""
    lr, decay = 0.05, 0.2
    model = bio_ext.convert(mlp(act=nn.Tanh), "dkp", seed=4, options={"feedback_lr": lr, "feedback_decay": decay})
    out = linears(model)[-1]
    gap0 = (out.feedback - out.weight).detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p is out.weight], lr=lr, weight_decay=decay)
    x, y = batch()
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.testing.assert_close(out.feedback - out.weight.detach(), gap0 * (1 - lr * decay) ** 5)


def test_dkp_dense_conv_feedback_step_is_the_error_times_the_flattened_input():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                        nn.Flatten(), nn.Linear(3 * 5 * 5, 4)).double()
    model = bio_ext.convert(net, "dkp", conv_feedback="dense", input_shape=(1, 5, 5), seed=0,
                            options={"feedback_lr": 0.3, "feedback_decay": 0.0})
    conv2 = model[2]
    old = conv2.feedback.clone()
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        h = torch.tanh(F.conv2d(x, model[0].weight, model[0].bias, padding=1))  # conv2's input
        out = model[5](torch.tanh(F.conv2d(h, conv2.weight, conv2.bias, padding=1)).flatten(1))
        e = (torch.softmax(out, 1) - F.one_hot(y, 4).double()) / len(y)
    want = old - 0.3 * (e.t() @ h.reshape(4, -1)).reshape(old.shape)
    torch.testing.assert_close(conv2.feedback, want)


# --------------------------------------------------------------------------- FDFA


def mean_jacobians(model, x):
    """The batch-mean Jacobian (D x K) of the output with respect to each converted layer's input after the first,
    by autograd on the reverted (plain) network."""
    plain = bio_ext.revert(model)
    layers = [m for m in plain if isinstance(m, nn.Linear)]
    out = []
    for k in range(1, len(layers)):
        idx = list(plain).index(layers[k])
        head, tail = plain[:idx], plain[idx:]
        with torch.no_grad():
            h = head(x)
        jac = torch.autograd.functional.jacobian(lambda z: tail(z).sum(0), h)  # (D, N, K)
        out.append(jac.sum(1) / len(x))  # sum over n of each row's own Jacobian (rows are independent)
    return out


def cosine(a, b):
    return float((a.reshape(-1) @ b.reshape(-1)) / (a.norm() * b.norm()))


@pytest.mark.parametrize("act,directions", [(nn.Tanh, 1), (nn.ReLU, 1), (nn.Tanh, 4)])
def test_fdfa_feedback_converges_to_the_true_jacobian_with_frozen_weights(act, directions):
    torch.manual_seed(0)
    model = bio_ext.convert(mlp(sizes=(8, 32, 24, 5), act=act), "fdfa", seed=0,
                            options={"momentum": 0.99, "directions": directions})
    x, y = batch(n=128, d=8, classes=5)
    hidden = linears(model)[1:]
    target = mean_jacobians(model, x)
    before = [cosine(layer.feedback, j) for layer, j in zip(hidden, target)]
    for _ in range(40 // directions):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    after = [cosine(layer.feedback, j) for layer, j in zip(hidden, target)]
    assert min(after) > 0.95, (before, after)
    assert max(abs(c) for c in before) < 0.8  # random feedback to start with
    for layer, j in zip(hidden, target):  # the average, not only its direction: the scale is the Jacobian's
        assert 0.8 < float(layer.feedback.norm() / j.norm()) < 1.25


def test_fdfa_average_is_bias_corrected():
    """Two steps with momentum 0 give the two estimates J1, J2 (same perturbations: same seed, frozen weights);
    with momentum b the feedback is then (b (1 - b) J1 + (1 - b) J2) / (1 - b^2), and after one step J1."""
    x, y = batch()
    net = mlp(act=nn.Tanh)

    def run(momentum, steps):
        torch.manual_seed(5)
        model = bio_ext.convert(net, "fdfa", seed=0, options={"momentum": momentum})
        model(x)  # the first-forward audit probe, before the seeded steps
        torch.manual_seed(6)
        fbs = []
        for _ in range(steps):
            F.cross_entropy(model(x), y).backward()
            fbs.append([layer.feedback.clone() for layer in linears(model)[1:]])
        return fbs

    est = run(0.0, 2)
    b = 0.9
    got = run(b, 2)
    for j1, j2, g1, g2 in zip(est[0], est[1], got[0], got[1]):
        assert not torch.allclose(j1, j2)
        torch.testing.assert_close(g1, j1)
        torch.testing.assert_close(g2, (b * (1 - b) * j1 + (1 - b) * j2) / (1 - b * b))


@pytest.mark.parametrize("act,sizes", [(nn.Tanh, (6, 9, 7, 4)), (nn.ReLU, (5, 8, 8, 8, 3))])
def test_fdfa_with_the_true_jacobian_as_feedback_gives_backprops_hidden_gradients(act, sizes):
    model = bio_ext.convert(mlp(sizes=sizes, act=act), "fdfa", options={"update": False})
    x = torch.randn(1, sizes[0], dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (1,))
    for layer, j in zip(linears(model)[1:], mean_jacobians(model, x)):
        with torch.no_grad():
            layer.feedback.copy_(j)
    plain = bio_ext.revert(model)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    got = [p.grad for p in model.parameters()]
    want = [p.grad for p in plain.parameters()]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_fdfa_feedback_stays_random_until_it_steps_and_update_false_freezes_it():
    model = bio_ext.convert(mlp(), "fdfa", seed=0, options={"update": False})
    start = [layer.feedback.clone() for layer in linears(model)]
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, layer.feedback) for a, layer in zip(start, linears(model)))


def test_fdfa_on_a_dense_conv_feedback_runs_and_refuses_the_kernel_shape():
    def net():
        return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
                             nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).double()

    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    dense = bio_ext.convert(net(), "fdfa", conv_feedback="dense", input_shape=(1, 5, 5))
    before = dense[2].feedback.clone()
    F.cross_entropy(dense(x), y).backward()
    assert not torch.equal(before, dense[2].feedback) and torch.isfinite(dense[2].feedback).all()
    kernel = bio_ext.convert(net(), "fdfa")
    with pytest.raises(UnsupportedModuleError, match="conv_feedback='dense'"):
        kernel(x)


# --------------------------------------------------------------------------- options and checkpoints


@pytest.mark.parametrize("mode,options,path", [
    ("pepita", {"error_reduction": "none"}, "options.error_reduction"),
    ("pepita", {"feedback_lr": 0.1}, "options.feedback_lr"),
    ("dkp", {"feedback_lr": -1.0}, "options.feedback_lr"),
    ("dkp", {"feedback_decay": float("nan")}, "options.feedback_decay"),
    ("dkp", {"momentum": 0.9}, "options.momentum"),
    ("fdfa", {"momentum": 1.0}, "options.momentum"),
    ("fdfa", {"directions": 0}, "options.directions"),
    ("fdfa", {"update": "yes"}, "options.update"),
    ("fdfa", {"feedback_lr": 0.1}, "options.feedback_lr"),
])
def test_bad_options_are_refused_with_their_path(mode, options, path):
    with pytest.raises(ConfigError) as info:
        bio_ext.convert(mlp(), mode, options=options)
    assert [p.path for p in info.value.problems] == [path]


@pytest.mark.parametrize("mode", PEERS)
def test_state_dict_round_trip_resumes_identically(mode):
    x, y = batch()
    net = mlp(act=nn.Tanh)
    a = bio_ext.convert(net, mode, seed=0)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(a(x), y).backward()
        opt.step()
    b = bio_ext.convert(mlp(act=nn.Tanh), mode, seed=99)
    b.load_state_dict(a.state_dict())
    assert a.state_dict().keys() == b.state_dict().keys()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert_same_backward(a, b, x, y)
    for la, lb in zip(linears(a), linears(b)):
        torch.testing.assert_close(la.feedback, lb.feedback)
