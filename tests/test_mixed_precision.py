"""Mixed precision (issue 13, item 1): every mode trains under ``torch.autocast``.

On CPU (bf16) a step under autocast runs in every mode, its gradients are finite, in the parameters' dtype,
and agree with the same step without autocast to bf16 precision (cosine per parameter). GrAPE's step is
compared from the same RNG state, so both runs draw the same perturbations. The CUDA cases (fp16 with a
GradScaler, bf16) run where a GPU is present.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext

MODES = ["fa", "usf", "dfa", "drtp", "grape"]


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(1)


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def attention():
    return nn.Sequential(nn.Linear(6, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                         Pool(), nn.Linear(16, 5))


MODELS = {"mlp": (mlp, (12,)), "cnn": (cnn, (3, 8, 8)), "attention": (attention, (4, 6))}


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def step_grads(model, x, y, amp, device="cpu", dtype=torch.bfloat16, scaler=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # GrAPE: the same perturbations in both runs
    region = torch.autocast(device, dtype=dtype) if amp else contextlib.nullcontext()
    with region:
        out = model(x)
        loss = F.cross_entropy(out, y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
    grads = {}
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert p.grad.dtype == p.dtype, (n, p.grad.dtype)
        assert torch.isfinite(p.grad).all(), n
        grads[n] = p.grad.detach().float().clone()
    return out, grads


def compare(name, mode, device="cpu", dtype=torch.bfloat16, scaler=None, min_cos=0.99):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = bio_ext.convert(factory().to(device), mode, seed=0)
    x, y = torch.randn(6, *shape, device=device), torch.randint(0, 5, (6,), device=device)
    ref = copy.deepcopy(model)
    _, want = step_grads(ref, x, y, amp=False)
    out, got = step_grads(model, x, y, amp=True, device=device, dtype=dtype, scaler=scaler)
    assert out.dtype == dtype  # the layers really ran in low precision
    for n in want:
        assert cosine(got[n], want[n]) > min_cos, (n, cosine(got[n], want[n]))
    if mode == "grape":  # the feedback stepped in its own dtype, to nearly the same place
        for (n, a), (_, b) in zip(bio_ext.feedback_layers(model), bio_ext.feedback_layers(ref)):
            assert a.feedback.dtype == torch.float32
            assert cosine(a.feedback, b.feedback) > 0.999, n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_cpu_bf16_autocast_matches_fp32(name, mode):
    compare(name, mode)


@pytest.mark.parametrize("mode", ["fa", "dfa", pytest.param("grape", marks=pytest.mark.slow)])
def test_cpu_bf16_autocast_attention(mode):
    compare("attention", mode)


@pytest.mark.parametrize("conv_feedback", ["dense", "factored"])
def test_cpu_bf16_autocast_conv_feedback_shapes(conv_feedback):
    torch.manual_seed(0)
    model = bio_ext.convert(cnn(), "grape", seed=0, conv_feedback=conv_feedback, input_shape=(3, 8, 8))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    ref = copy.deepcopy(model)
    _, want = step_grads(ref, x, y, amp=False)
    _, got = step_grads(model, x, y, amp=True)
    for n in want:
        assert cosine(got[n], want[n]) > 0.99, n


def test_autocast_inputs_casts_only_inside_a_region():
    from bio_ext.functional import autocast_inputs
    x, w, idx = torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), torch.arange(3)
    assert autocast_inputs(x, w, None, idx)[0] is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, none, cidx = autocast_inputs(x, w, None, idx)
    assert cx.dtype == torch.bfloat16 and cw.dtype == torch.float64 and none is None and cidx is idx


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_cuda_fp16_autocast_with_grad_scaler(name, mode):
    compare(name, mode, device="cuda", dtype=torch.float16, scaler=torch.amp.GradScaler("cuda"))


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn", "attention"])
def test_cuda_bf16_autocast(name, mode):
    compare(name, mode, device="cuda", dtype=torch.bfloat16)
