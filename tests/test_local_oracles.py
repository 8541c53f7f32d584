"""Exact oracles for the sign-concordant modes and for bias gradients (issue 17, 'tests that let real bugs
through'): every formula below is written out by hand, independently of bio_ext's helpers.

* usf / brsf / frsf with ``scale != 1`` and each ``init``: the rule's feedback equals the biotorch formula,
  and the layer's input gradient equals ``grad_out @ B`` (Linear) or the transposed convolution with B
  (Conv2d);
* bias gradients of Linear and Conv2d under FA and DFA: the sum of the layer's own output gradient over
  the batch (and the grid), where that gradient is built by hand from the feedback; for a DFA Conv2d it
  is the sum over batch and grid of the injected signal times the activation's derivative.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.modes.base import feedback_generator

SCALE = 2.5


def _std(init, fan_in, fan_out):
    return {"kaiming": 1 / math.sqrt(3 * fan_in), "xavier": math.sqrt(2 / (fan_in + fan_out)),
            "normal": 1 / math.sqrt(fan_in)}[init]


def _fans(layer):
    if isinstance(layer.weight, torch.Tensor) and layer.weight.dim() == 4:
        c_out, c_in, kh, kw = layer.weight.shape
        return c_in * kh * kw, c_out * kh * kw
    return layer.weight.shape[1], layer.weight.shape[0]


def _draw(shape, init, std, generator):
    out = torch.empty(shape, dtype=torch.float64)
    if init == "normal":
        return out.normal_(0.0, std, generator=generator)
    return out.uniform_(-std * math.sqrt(3), std * math.sqrt(3), generator=generator)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 3)).double()


def _data(build):
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64) if build is _mlp else torch.randn(6, 2, 5, 5, dtype=torch.float64)
    return x, torch.randint(0, 3, (6,))


def _watch(model):
    """``{layer: (input, output)}`` of every converted layer after a forward, both retaining their grads."""
    seen = {}
    for _, layer in bio_ext.feedback_layers(model):
        def hook(m, args, out):
            if args[0].requires_grad:
                args[0].retain_grad()
            out.retain_grad()
            seen[m] = (args[0], out)
        layer.register_forward_hook(hook)
    return seen


def _input_grad(layer, g, b, x):
    """The input gradient FA's rule gives: ``g @ B`` (Linear), the transposed convolution with B (Conv2d)."""
    if b.dim() == 2:
        return g @ b
    return torch.nn.grad.conv2d_input(x.shape, b, g, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("init", ["kaiming", "xavier", "normal"])
@pytest.mark.parametrize("mode", ["usf", "brsf", "frsf"])
@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["linear", "conv2d"])
def test_sign_concordant_feedback_and_input_gradient_equal_the_formula(build, mode, init):
    model = bio_ext.convert(build(), mode, init=init, scale=SCALE, seed=7)
    layers = [layer for _, layer in bio_ext.feedback_layers(model)]
    gen = feedback_generator(7)
    magnitudes = {}
    for layer in layers:  # frsf's |M|, drawn at convert in layer order from the seed's stream
        std = _std(init, *_fans(layer)) * SCALE
        magnitudes[layer] = _draw(layer.weight.shape, init, std, gen).abs()
    seen = _watch(model)
    x, y = _data(build)
    torch.manual_seed(123)  # brsf redraws |M| from the global stream at every forward, in layer order
    out = model(x)
    torch.manual_seed(123)
    redrawn = {layer: _draw(layer.weight.shape, init, _std(init, *_fans(layer)) * SCALE, None).abs()
               for layer in layers}
    F.cross_entropy(out, y).backward()
    for layer in layers:
        sign = torch.sign(layer.weight.detach())
        std = _std(init, *_fans(layer)) * SCALE
        expected = {"usf": sign * std, "brsf": redrawn[layer] * sign, "frsf": magnitudes[layer] * sign}[mode]
        torch.testing.assert_close(layer.feedback, expected, rtol=1e-12, atol=0)
        if mode == "frsf":
            torch.testing.assert_close(layer.feedback_magnitude, magnitudes[layer], rtol=1e-12, atol=0)
        inp, outp = seen[layer]
        if inp.grad is not None:
            torch.testing.assert_close(inp.grad, _input_grad(layer, outp.grad, expected, inp), rtol=1e-10, atol=1e-12)


def _conv_dfa_projection(layer, e, b, hw_out):
    """DFA's kernel-shaped Conv2d projection by hand: the error broadcast over the output grid, times
    1/sqrt(H_out W_out), through the transposed convolution with B as kernel."""
    ho, wo = hw_out
    grid = e[:, :, None, None].expand(e.shape[0], e.shape[1], ho, wo) * (ho * wo) ** -0.5
    return F.conv_transpose2d(grid, b, stride=layer.stride, padding=layer.padding, dilation=layer.dilation)


@pytest.mark.parametrize("mode", ["fa", "dfa"])
@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["linear", "conv2d"])
def test_bias_gradients_equal_their_formula(build, mode):
    """Going down the net by hand: each layer's output gradient is the next layer's input gradient (FA:
    ``g @ B``; DFA: the injected ``e @ B``) times tanh', and its bias gradient is that summed over the batch
    and, for a Conv2d, over the grid: for a DFA Conv2d the sum of the injected signal times tanh'."""
    model = bio_ext.convert(build(), mode, seed=3, conv_error="norm")
    layers = [layer for _, layer in bio_ext.feedback_layers(model)]
    seen = _watch(model)
    x, y = _data(build)
    out = model(x)
    F.cross_entropy(out, y).backward()
    with torch.no_grad():
        e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / len(y)
        g = e  # the output layer's own output gradient
        torch.testing.assert_close(layers[-1].bias.grad, e.sum(0))
        for below, above in zip(layers[-2::-1], layers[:0:-1]):
            inp, outp = seen[above]
            if mode == "fa":
                injected = _input_grad(above, g, above.feedback, inp)
            elif above.weight.dim() == 4:
                injected = _conv_dfa_projection(above, e, above.feedback, outp.shape[-2:])
            else:
                injected = e @ above.feedback
            injected = injected.reshape(seen[below][1].shape)  # through Flatten
            g = injected * (1 - seen[below][1].tanh() ** 2)  # tanh' at the layer below's output
            dims = (0, 2, 3) if g.dim() == 4 else (0,)
            torch.testing.assert_close(below.bias.grad, g.sum(dims), rtol=1e-10, atol=1e-12)
