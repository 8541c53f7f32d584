"""bio_ext on a CUDA device: every deterministic mode's training steps equal the same steps on the CPU (float64), and
GrAPE, whose perturbations are drawn on the device, equals its hand-computed rule there, trains a ResNet and a GPT-2
(its fused attention tangent on the device's kernels against torch's math path with forward AD).

Skipped without a CUDA device (CI has none); run them where one is lent (``benchmarks/gpu_session.sh``).
``BIO_EXT_TEST_DEVICE=cpu`` runs the same checks on the CPU against itself, which checks the tests' own code."""

import copy
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import bio_ext
from bio_ext.modes import grape_attention

DEVICE = os.environ.get("BIO_EXT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda] if DEVICE.startswith("cuda") else []


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()


CASES = [(_mlp, (8, 5), {}), (_cnn, (6, 1, 8, 8), {}),
         (_cnn, (6, 1, 8, 8), {"conv_feedback": "dense", "input_shape": (1, 8, 8)})]
IDS = ["mlp", "cnn-kernel", "cnn-dense"]


def _steps(model, x, y, n=2):
    """``n`` SGD steps; returns the gradients of the last one and the model's state after them."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(n):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: p.grad.detach().cpu() for k, p in model.named_parameters()}, \
        {k: v.detach().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("mode", ["bp", "fa", "usf", "frsf", "dfa", "drtp", "dkp"])
@pytest.mark.parametrize("build, shape, kw", CASES, ids=IDS)
def test_steps_on_the_device_equal_the_same_steps_on_the_cpu(build, shape, kw, mode):
    """Every mode whose steps draw nothing (brsf redraws its magnitudes every batch, on the device's generator)."""
    torch.manual_seed(1)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    cpu = bio_ext.convert(build(), mode, seed=0, **kw)
    dev = copy.deepcopy(cpu).to(DEVICE)
    want_g, want_s = _steps(cpu, x, y)
    got_g, got_s = _steps(dev, x.to(DEVICE), y.to(DEVICE))
    for k in want_g:  # the gradients of the second step, after the first changed weights (and dkp's feedback)
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-9, atol=1e-12, msg=k)
    for k in want_s:  # weights and feedback buffers
        torch.testing.assert_close(got_s[k], want_s[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("mode", ["fa", "dfa", "dkp", "grape"])
@pytest.mark.parametrize("build, shape, kw", CASES, ids=IDS)
def test_a_model_stepped_on_the_cpu_then_moved_steps_on_the_device(build, shape, kw, mode):
    """What a model keeps between steps (a convolution's spread matrices, the feedback bank's shared storage, GrAPE's
    velocity and counters) follows ``.to(device)``: the step after the move equals the CPU's second step, or, for
    GrAPE (whose draws differ by device), is a finite step that turns every feedback on the device."""
    torch.manual_seed(1)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    cpu = bio_ext.convert(build(), mode, seed=0, **kw)
    _steps(cpu, x, y, n=1)
    moved = copy.deepcopy(cpu).to(DEVICE)
    before = {n: l.feedback.detach().clone() for n, l in bio_ext.feedback_layers(moved)}
    got_g, got_s = _steps(moved, x.to(DEVICE), y.to(DEVICE), n=1)
    if mode != "grape":
        want_g, want_s = _steps(cpu, x, y, n=1)
        for k in want_g:
            torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-9, atol=1e-12, msg=k)
        for k in want_s:
            torch.testing.assert_close(got_s[k], want_s[k], rtol=1e-9, atol=1e-12, msg=k)
        return
    assert all(torch.isfinite(g).all() for g in got_g.values())
    for n, layer in bio_ext.feedback_layers(moved):
        assert layer.feedback.device.type == torch.device(DEVICE).type, n
        if n != "0":  # the first layer's input is the data: not perturbed, no feedback step
            assert not torch.equal(layer.feedback, before[n]) and int(layer.feedback_steps) == 2, n


@pytest.mark.parametrize("build, shape, kw", CASES, ids=IDS)
def test_brsf_trains_on_the_device(build, shape, kw):
    torch.manual_seed(1)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    model = bio_ext.convert(build(), "brsf", seed=0, **kw).to(DEVICE)
    grads, _ = _steps(model, x.to(DEVICE), y.to(DEVICE))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("which", ["linear", "conv2d"])
def test_grape_steps_on_the_device_equal_the_hand_computed_rule(which):
    """The perturbations are drawn on the device (another stream than the CPU's): the exact oracle of
    tests/test_grape_oracles.py (cosine, velocity, rate, renormalised feedback, injected gradient), there."""
    from test_grape_oracles import _cnn as oracle_cnn, _mlp as oracle_mlp, _run
    build, shape = (oracle_mlp, (8, 5)) if which == "linear" else (oracle_cnn, (6, 1, 7, 7))
    torch.manual_seed(2)
    model = _run(build, torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],)), steps=2,
                 device=DEVICE)
    assert all(layer.feedback.device.type == torch.device(DEVICE).type for _, layer in bio_ext.feedback_layers(model))


@pytest.mark.parametrize("directions", [1, 2])
def test_grape_trains_a_resnet18_on_the_device(directions):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = bio_ext.convert(torchvision.models.resnet18(num_classes=10), "grape",
                            options={"directions": directions}).to(DEVICE)
    before = {n: l.feedback.detach().clone() for n, l in bio_ext.feedback_layers(model)}
    x, y = torch.randn(8, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (8,), device=DEVICE)
    _steps(model, x, y)
    for n, layer in bio_ext.feedback_layers(model):
        if n == "conv1":  # its input is the image: no gradient, no perturbation, no feedback step
            continue
        assert torch.isfinite(layer.grape_cos), n
        assert int(layer.feedback_skips) == 0, n
        assert not torch.equal(layer.feedback, before[n]), n  # the feedback turned
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_attention_tangent_on_the_device_equals_the_math_path(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype, device=DEVICE) for _ in range(3))
    tq, tk, tv = (torch.randn_like(q) for _ in range(3))
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip((q, k, v), (tq, tk, tv))]
        with sdpa_kernel([SDPBackend.MATH]):
            ref = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, is_causal=True))
        with grape_attention.TangentAttention():
            got = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, is_causal=True))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.primal, ref.primal, **tol)
    torch.testing.assert_close(got.tangent, ref.tangent, **tol)


@pytest.mark.parametrize("granularity", ["layer", "macro"])
def test_grape_trains_a_gpt2_with_sdpa_attention_on_the_device(granularity):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = bio_ext.convert(transformers.GPT2LMHeadModel(cfg), "grape", granularity=granularity).to(DEVICE)
    ids = torch.randint(0, 50, (4, 16), device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    turned = [l for _, l in bio_ext.feedback_layers(model)] + [p for _, p in bio_ext.feedback_points(model)]
    stepped = [x for x in turned if hasattr(x, "grape_cos")]  # not the layers whose input is an embedding lookup's
    assert stepped and all(torch.isfinite(x.grape_cos) and int(x.feedback_skips) == 0 for x in stepped)
