"""torch.compile (issue 13, item 3), as far as it goes today.

* the local family (fa, usf, ...): a converted MLP is one graph, no break, and compiled gradients equal eager;
* the direct family (dfa, drtp): the session's hooks run outside the compiled region
  (``torch._dynamo.disable``) and the Functions have no custom ``jvp`` (only GrAPE's do), but dynamo still
  cannot trace a direct Function's backward (it reads the session's projection, made during the backward), so
  the frames holding converted layers fall back to eager: compiled gradients equal eager, without a speed-up;
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
        dynamo.reset()
        e = dynamo.explain(bio_ext.convert(mlp(depth), "fa", seed=0))(torch.randn(5, 8))
        assert e.graph_break_count == 0 and e.graph_count == 1, (depth, e.break_reasons)


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
