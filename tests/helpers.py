"""Model factories and checks shared by the tests."""

import torch
import torch.nn as nn

import bio_ext


def tanh_mlp(sizes=(6, 7, 5, 4), dtype=torch.float64):
    return relu_mlp(sizes, act=nn.Tanh, dtype=dtype)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def set_feedback_to_weights(model):
    """FA oracle: make every converted layer's feedback equal its forward weight."""
    from bio_ext import feedback_layers
    for _, layer in feedback_layers(model):
        with torch.no_grad():
            layer.feedback.copy_(layer.weight)


def train_steps(model, x, y, steps=3, lr=0.05, loss_fn=None, optimizer=torch.optim.SGD, compute_loss=None):
    """``steps`` optimizer steps; every gradient must be finite. ``compute_loss(model)`` replaces
    ``loss_fn(model(x), y)`` (e.g. a transformers model's own ``labels=`` loss). Returns the losses."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    compute_loss = compute_loss or (lambda m: loss_fn(m(x), y))
    opt = optimizer(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = compute_loss(model)
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), n
        opt.step()
        losses.append(loss.item())
    return losses


def dfa_signal(e, y):
    """What DFA projects: the output error itself."""
    return e


def drtp_signal(e, y):
    """What DRTP projects: the negated one-hot target of a mean-reduced loss, -onehot(y) / N."""
    import torch.nn.functional as F
    return -F.one_hot(y, e.shape[1]).to(e.dtype) / len(y)


def assert_dfa_hand_gradients(layers, x, y, signal=dfa_signal, loss_scale=1.0):
    """DFA-family oracle for a 3-layer tanh MLP (cross-entropy, mean, times ``loss_scale``): the output
    layer trains on the true error e; hidden layer l gets ((s @ B_{l+1}) * tanh'(a_l))^T h_{l-1}, where
    B_{l+1} is the next layer's feedback and s = signal(e, y) (DFA: e itself; DRTP: the target)."""
    import torch.nn.functional as F
    l1, l2, l3 = layers
    with torch.no_grad():
        h1 = torch.tanh(x @ l1.weight.t() + l1.bias)
        h2 = torch.tanh(h1 @ l2.weight.t() + l2.bias)
        a3 = h2 @ l3.weight.t() + l3.bias
        e = loss_scale * (torch.softmax(a3, 1) - F.one_hot(y, a3.shape[1])) / len(y)  # dL/d(output)
        s = signal(e, y)
        d2 = (s @ l3.feedback) * (1 - h2 ** 2)
        d1 = (s @ l2.feedback) * (1 - h1 ** 2)
    torch.testing.assert_close(l3.weight.grad, e.t() @ h2)
    torch.testing.assert_close(l3.bias.grad, e.sum(0))
    torch.testing.assert_close(l2.weight.grad, d2.t() @ h1)
    torch.testing.assert_close(l2.bias.grad, d2.sum(0))
    torch.testing.assert_close(l1.weight.grad, d1.t() @ x)
    torch.testing.assert_close(l1.bias.grad, d1.sum(0))


def relu_mlp(sizes=(6, 9, 7, 4), act=nn.ReLU, bias=True, dtype=torch.float64):
    """Linear layers with ``act`` between them (none after the last), in ``dtype``: the peers' test network."""
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def feedback_layers_of(model):
    """The converted layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, bio_ext.FeedbackLayer)]


def float64_batch(n=16, d=6, classes=4):
    """``n`` standard-normal float64 inputs of width ``d`` and random labels among ``classes``."""
    return torch.randn(n, d, dtype=torch.float64), torch.randint(0, classes, (n,))


def assert_same_backward(a, b, x, y, seed=7):
    """One cross-entropy backward of ``a`` and of ``b`` from the same global RNG state gives the same ``.grad``
    on every parameter (``a`` and ``b`` hold the same state, e.g. after ``load_state_dict``)."""
    for m in (a, b):
        m.zero_grad()
    for m in (a, b):
        torch.manual_seed(seed)
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)



def assert_point_estimates_sum_to_true(monkeypatch, conv, ids, true):
    """GrAPE at feedback points: the estimate at point k is <e, t> u_k (t: the tangent at the tap). With u_k running
    over the standard basis and every other point's u zero, the estimates sum to J_k^T e, the true gradient at point
    k (``true[k]``), exactly: so with u ~ N(0, I) (E[u u^T] = I) the estimate is unbiased. ``conv``: a language model
    converted with ``keep_estimate``, run on ``ids`` with ``labels=ids``."""
    from unittest import mock

    from bio_ext.modes.grape import GradientAlignedProjectedError as GrAPE
    points = [p for _, p in bio_ext.feedback_points(conv)]
    perturb = GrAPE.perturb
    pick = {}

    def perturb_with(self, session, slot, x):
        u = torch.zeros(x.shape, dtype=x.dtype)
        if slot == pick["slot"]:
            u.view(-1)[pick["i"]] = 1.0
        with mock.patch.object(torch, "randn", lambda *a, **k: u):
            return perturb(self, session, slot, x)

    monkeypatch.setattr(GrAPE, "perturb", perturb_with)
    for slot, (point, t) in enumerate(zip(points, true)):
        total = torch.zeros(t.numel(), dtype=t.dtype)
        for i in range(t.numel()):
            pick.update(slot=slot, i=i)
            conv(input_ids=ids, labels=ids).loss.backward()
            total += point.forward_gradient.reshape(-1)
        torch.testing.assert_close(total, t.reshape(-1), rtol=1e-9, atol=1e-12)


def grape_output_tangents(monkeypatch, net, x, y, switch_off, **convert_kwargs):
    """The output tangent of one GrAPE forward of ``convert(net, "grape", seed=0, feedback_lr=0, **convert_kwargs)``
    on ``(x, y)``, then of another after ``switch_off(monkeypatch)`` (a fast tangent path off): the same
    perturbations both times, so the two are equal exactly when the fast path computes torch's tangent."""
    from bio_ext.modes.grape import GradientAlignedProjectedError as Rule
    seen, on_output = [], Rule.on_output

    def record(self, session, output):
        out = on_output(self, session, output)
        seen.append(session.rule_state.out_tangent.clone())
        return out

    monkeypatch.setattr(Rule, "on_output", record)
    tangents = []
    for fast in (True, False):
        if not fast:
            switch_off(monkeypatch)
        model = bio_ext.convert(net, "grape", seed=0, options={"feedback_lr": 0.0}, **convert_kwargs)
        torch.manual_seed(5)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        tangents.append(seen[-1])
    return tangents
