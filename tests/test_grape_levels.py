"""GrAPE inside the user's own forward-mode AD level and in two threads at once (issue 17): both raised
"Nested forward mode AD is not supported". GrAPE now reuses a level that is already open (its own, from
another thread, counted; or the user's, when the forward's inputs carry none of the user's tangents),
and refuses with a typed error naming the fix when they do."""

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors


def _model(seed=0):
    torch.manual_seed(seed)
    return bio_ext.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)),
                           "grape", seed=0)


def _step(model, x, y):
    F.cross_entropy(model(x), y).backward()
    return [(int(m.feedback_steps), m.feedback.clone()) for _, m in bio_ext.feedback_layers(model)[1:]]


def test_grape_inside_the_users_own_dual_level_steps_as_outside_and_leaves_the_users_tangents_alone():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model = _model()
    torch.manual_seed(7)
    outside = _step(model, x, y)
    model = _model()
    with fwAD.dual_level():
        mine = fwAD.make_dual(torch.ones(3), torch.full((3,), 2.0))
        torch.manual_seed(7)
        inside = _step(model, x, y)
        assert torch.equal(fwAD.unpack_dual(mine).tangent, torch.full((3,), 2.0))
        assert fwAD.unpack_dual(model(x)).tangent is None  # the output carries none of GrAPE's tangents
    for (s_in, fb_in), (s_out, fb_out) in zip(inside, outside):
        assert s_in == s_out == 1
        torch.testing.assert_close(fb_in, fb_out, rtol=0, atol=0)
    assert _step(model, x, y)[0][0] == 2  # and after it: GrAPE opens its own level again


def test_grape_on_inputs_carrying_the_users_tangents_is_a_typed_error_naming_the_fix():
    model = _model()
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(16, 4), torch.randn(16, 4))
        with pytest.raises(errors.BioExtError) as exc:
            model(x)
    assert isinstance(exc.value, ValueError)
    for word in ("dual_level", "tangent", "'dfa'"):
        assert word in str(exc.value), word
    F.cross_entropy(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()  # nothing was left open


def test_grape_in_two_threads_at_once():
    """Each thread's forward waits inside the model for the other's, so both run under one level."""
    barrier = threading.Barrier(2, timeout=20)
    models = [_model(0), _model(1)]
    for m in models:
        m[1].register_forward_hook(lambda *a: (barrier.wait(), None)[1])
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    results, failures = {}, []

    def work(i):
        try:
            results[i] = [_step(models[i], x, y) for _ in range(2)][-1]
        except BaseException as exc:  # reported below
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    for i in range(2):
        assert all(steps == 2 and torch.isfinite(fb).all() for steps, fb in results[i])
    assert fwAD._current_level == -1


def test_first_grape_forward_of_a_process_emits_no_torch_jit_future_warning():
    """torch loads its forward-AD decompositions at the first make_dual and (2.14) warns that torch.jit.script is
    deprecated: torch's internals, nothing a user can change, so GrAPE loads them quietly. A fresh process is needed
    (the load happens once per process); its warnings are turned into errors."""
    import subprocess
    import sys

    code = ("import torch, torch.nn as nn, bio_ext\n"
            "m = bio_ext.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), 'grape')\n"
            "m(torch.randn(5, 4)).sum().backward()\n"
            "print('stepped', int(m[2].feedback_steps))\n")
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stepped 1" in out.stdout
