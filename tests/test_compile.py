"""torch.compile (issue 13, item 3).

* the local family (fa, usf, ...): a converted MLP is one graph, no break, and compiled gradients equal eager
  (once the one-time check of the first forward has run: :mod:`bio_ext.audit`);
* the direct family (dfa, drtp): the layers take their traceable path (plain ops on a detached input; the
  error tap, which runs eagerly, injects ``e @ B`` at their inputs): the breaks are the session's hooks at the
  root and the output tap, whatever the depth, and compiled gradients equal eager for every conv shape;
* grape: compiles with graph breaks (perturbations drawn eagerly) and gives eager's gradients.

Compiling on CPU is slow: the checks beyond the one dynamo-only count are marked slow, and use the
``aot_eager`` backend (dynamo and AOTAutograd, no code generation).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext


def mlp(depth=2):
    layers = [nn.Linear(8, 16), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, 4))


def test_fa_mlp_compiles_to_one_graph_without_a_break():
    import torch._dynamo as dynamo
    for depth in (1, 4):
        for checked_at in ("convert", "first forward"):
            dynamo.reset()
            model = bio_ext.convert(mlp(depth), "fa", seed=0, input_shape=(8,) if checked_at == "convert" else None)
            if checked_at == "first forward":
                model(torch.randn(5, 8))  # the one-time weight-use check, which removes its hook
            e = dynamo.explain(model)(torch.randn(5, 8))
            assert e.graph_break_count == 0 and e.graph_count == 1, (depth, checked_at, e.break_reasons)


def cnn(depth=1):
    convs = [nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        convs += [nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()]
    return nn.Sequential(*convs, nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))


def compiled_graphs(model, x, calls=2):
    """``(graphs, breaks)`` dynamo made for ``calls`` forwards and backwards of ``model`` (dynamo only)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(calls):
        out = compiled(x)
        F.cross_entropy(out, torch.zeros(len(out), dtype=torch.long)).backward()
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("mode", ["dfa", "drtp"])
def test_direct_modes_compile_to_one_graph_whatever_the_depth(mode):
    """The session's hooks at the root run eagerly, the layers trace, and the error is tapped at the root after
    the compiled region: one graph for the whole model (a break inside ``nn.Sequential``'s loop would make
    dynamo run the model eagerly layer by layer), whether the output layer was found at conversion, at the
    first forward, or given."""
    seen = {}
    for kind, make, x in (("mlp", mlp, torch.randn(5, 8)), ("cnn", cnn, torch.randn(5, 3, 8, 8))):
        for depth, hows in ((1, ("probed at convert",)), (4, ("probed at convert", "found at the first forward",
                                                                "given"))):
            for how in hows:
                net = make(depth)
                kw = {"input_shape": tuple(x.shape[1:])} if how != "found at the first forward" else {}
                if how == "given":
                    kw["output_layer"] = str(len(net) - 1)
                seen[kind, depth, how] = compiled_graphs(bio_ext.convert(net, mode, seed=0, **kw), x)
    assert all(graphs == 1 and breaks <= 1 for graphs, breaks in seen.values()), seen


def test_an_output_layer_whose_output_is_not_returned_as_it_is_is_tapped_where_it_runs_under_compile():
    """``return head(h) * 2``: the error cannot wait for the root, so the tap breaks the graph at the output layer
    (correct gradients, two graphs) rather than the model being refused."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) * 2.0

    model = bio_ext.convert(Scaled(), "dfa", seed=0, input_shape=(8,))
    eager = copy.deepcopy(model)
    graphs, breaks = compiled_graphs(model, torch.ones(5, 8), calls=1)
    assert graphs >= 2 and breaks >= 1
    out = eager(torch.ones(5, 8))
    F.cross_entropy(out, torch.zeros(len(out), dtype=torch.long)).backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


# dfa on this all-ReLU cnn: {} is radial="output" (auto), {"radial": "keep"} the projection as it is
DIRECT_CASES = [(mode, kw) for mode in ("dfa", "drtp") for kw in
                ({}, {"radial": "keep"}, {"tangential": True}, {"conv_feedback": "dense"}, {"conv_feedback": "factored"})]


@pytest.mark.parametrize("mode, kw", DIRECT_CASES, ids=[f"{m}-{'-'.join(map(str, k.values())) or 'kernel'}"
                                                         for m, k in DIRECT_CASES])
def test_direct_modes_compiled_gradients_equal_eager_on_a_cnn(mode, kw):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = bio_ext.convert(cnn(), mode, seed=0, input_shape=(3, 8, 8), **kw)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(2):
        x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), eager.parameters())]
        assert all(g is not None for _, g, _ in grads)
        for n, g, h in grads:
            torch.testing.assert_close(g, h, msg=n)
    # and they are DFA's, not backprop's: the first convolution's input gradient is e @ B spread, not W^T g
    plain = copy.deepcopy(bio_ext.revert(eager, inplace=False))
    plain.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(plain[0].weight.grad, model[0].weight.grad)


class AfterOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.late = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        out = self.fc2(h)
        self.late(h.detach().requires_grad_())  # a converted layer running after the tap
        return out * 1.0  # not the output layer's output as it is: the tap runs at the output layer


def test_a_converted_layer_running_after_the_output_layer_is_refused_under_compile():
    """Tapped at the output layer (its output is not returned as it is), a compiled forward cannot hand the error
    to a layer that runs after it (eager gives it ``e @ B`` from the session): refused, naming the fix."""
    torch._dynamo.reset()
    model = bio_ext.convert(AfterOutput(), "dfa", seed=0, output_layer="fc2", input_shape=(8,))
    with pytest.raises(bio_ext.FeedbackSignalError, match="after the model's output layer"):
        torch.compile(model, backend="aot_eager")(torch.randn(5, 8))


def compiled_matches_eager(mode, steps=2):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = bio_ext.convert(mlp(), mode, seed=0)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    for step in range(steps):
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            F.cross_entropy(m(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    if mode == "grape":
        for (n, a), (_, b) in zip(bio_ext.feedback_layers(model), bio_ext.feedback_layers(eager)):
            torch.testing.assert_close(a.feedback, b.feedback, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fa", "dfa", "drtp", "grape"])
def test_compiled_gradients_equal_eager(mode):
    compiled_matches_eager(mode)


@pytest.mark.slow
def test_step_time_compile_flag_runs():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "step_time.py"), "--models", "mlp", "--modes",
                          "fa", "--rounds", "1", "--per-round", "1", "--warmup", "1", "--no-biotorch", "--no-floor",
                          "--compile", "--compile-backend", "aot_eager"], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""})
    assert "compiled / eager" in out.stdout and "bio_ext fa" in out.stdout


@pytest.mark.slow
def test_step_time_profile_flag_prints_each_variants_top_ops():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "step_time.py"), "--models", "mlp", "--modes",
                          "grape", "--rounds", "1", "--per-round", "1", "--warmup", "0", "--no-biotorch",
                          "--no-floor", "--profile", "1"], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(root), "PATH": ""})
    assert "#### profile: backprop" in out.stdout and "#### profile: bio_ext grape" in out.stdout
    assert "| aten::mm |" in out.stdout  # the products are among the top ops of every variant
