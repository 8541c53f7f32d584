"""Real architectures: torchvision CNNs and transformers' GPT-2 (Conv1D) through every mode."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from helpers import grads, set_feedback_to_weights, train_steps

torchvision = pytest.importorskip("torchvision")

MODES = ["bp", "fa", "dfa", "drtp", "usf", "brsf", "frsf"]
VISION = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=10),
}


# vgg11 (133M parameters, 10-17 s a case on 2 cores) runs dfa in the default suite, every mode under -m slow
CASES = [pytest.param(arch, mode, marks=[pytest.mark.slow] if arch == "vgg11" and mode != "dfa" else [])
         for arch in VISION for mode in MODES]


@pytest.mark.parametrize("arch, mode", CASES)
def test_torchvision_model_converts_and_trains_with_finite_gradients(arch, mode):
    torch.manual_seed(0)
    model = VISION[arch]()
    n_plain = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    conv = bio_ext.convert(model, mode)
    assert len(bio_ext.feedback_layers(conv)) == n_plain
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    losses = train_steps(conv, x, y, steps=2, lr=0.01)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is not None for p in conv.parameters() if p.requires_grad)


def test_resnet18_fa_with_feedback_equal_to_weights_matches_autograd():
    model = torchvision.models.resnet18(num_classes=10).double().eval()  # eval: BN is deterministic
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([3, 7])
    F.cross_entropy(model(x), y).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    conv = bio_ext.convert(model, "fa")
    set_feedback_to_weights(conv)
    F.cross_entropy(conv(x), y).backward()
    got = grads(conv)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_resnet18_dfa_gradients_are_on_the_scale_of_backprop():
    """The default 'norm' spread keeps early-layer DFA gradients within an order of magnitude of
    BP's; biotorch's unscaled broadcast ('sum') is larger by sqrt(H_out W_out) (8 here)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    bp = model.layer1[0].conv1.weight.grad.norm()
    ratios = {}
    for how in ("norm", "sum"):
        conv = bio_ext.convert(model, "dfa", conv_error=how, init="normal", seed=0, radial="keep")
        conv.zero_grad()
        F.cross_entropy(conv(x), y).backward()
        ratios[how] = (conv.layer1[0].conv1.weight.grad.norm() / bp).item()
    assert 0.1 < ratios["norm"] < 10, ratios
    assert ratios["sum"] > 4 * ratios["norm"], ratios


# ----------------------------------------------------------------------------- transformers Conv1D
def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def test_gpt2_conv1d_layers_convert_and_fa_matches_autograd():
    model = _tiny_gpt2().double()
    from transformers.pytorch_utils import Conv1D
    n_conv1d = sum(isinstance(m, Conv1D) for m in model.modules())
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    conv = bio_ext.convert(model, "fa")
    kinds = [m.transposed for _, m in bio_ext.feedback_layers(conv)]
    assert sum(kinds) == n_conv1d == 8
    assert all(m.feedback.shape == m.weight.shape for _, m in bio_ext.feedback_layers(conv))
    set_feedback_to_weights(conv)
    conv(ids, labels=ids).loss.backward()
    got = grads(conv)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["bp", "fa", "dfa"])
def test_gpt2_trains_under_each_mode_with_unchanged_loop(mode):
    model = bio_ext.convert(_tiny_gpt2(), mode)
    ids = torch.randint(0, 50, (4, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss  # the error is read off ModelOutput.logits
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    reverted = bio_ext.revert(model)
    from transformers.pytorch_utils import Conv1D
    assert isinstance(reverted.transformer.h[0].attn.c_attn, Conv1D)


def test_gpt2_bp_mode_is_identical_to_autograd():
    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    conv = bio_ext.convert(model, "bp")
    conv(ids, labels=ids).loss.backward()
    got = grads(conv)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["fa", "dfa"])
def test_cuda_resnet18_trains(mode):
    model = bio_ext.convert(torchvision.models.resnet18(num_classes=10), mode).cuda()
    x, y = torch.randn(4, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4,), device="cuda")
    losses = train_steps(model, x, y, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
