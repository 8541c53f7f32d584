"""The output layer from the data flow, not from registration order (issue 17, item 1): an auxiliary head
registered after the classifier is not taken for it, a model returning two heads' outputs is refused with
their names, and a model whose output comes from a Conv2d (torchvision's SqueezeNet) needs no output_layer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from bio_ext.convert import state_of
from bio_ext.session import output_hook
from bio_ext._utils.hooks import hook_function


class AuxNet(nn.Module):
    """A classifier ``fc`` and an auxiliary head ``aux`` registered after it (of another width)."""

    def __init__(self, returns="dict"):
        super().__init__()
        self.returns = returns
        self.fc1, self.fc2, self.fc, self.aux = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 5)

    def forward(self, x):
        h1 = torch.tanh(self.fc1(x))
        h2 = torch.tanh(self.fc2(h1))
        if self.returns == "dict":
            return {"logits": self.fc(h2), "aux": self.aux(h1)}
        return self.fc(h2), self.aux(h1)


def _grads(model, x, y):
    out = model(x)
    F.cross_entropy(out["logits"] if isinstance(out, dict) else out[0], y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _taps(model):
    return [n for n, m in model.named_modules() for h in m._forward_hooks.values() if hook_function(h) is output_hook]


@pytest.mark.parametrize("mode", ["dfa", "grape"])
@pytest.mark.parametrize("how", ["probe at convert", "first forward"])
def test_an_auxiliary_head_registered_after_the_classifier_is_not_the_output_layer(how, mode):
    """The hidden layers' gradients (and GrAPE's feedback step) equal those of output_layer='fc' exactly;
    before, the auxiliary head's error was injected (or the backward failed)."""
    torch.manual_seed(0)
    base = AuxNet()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    explicit = bio_ext.convert(base, mode, seed=0, output_layer="fc")
    found = bio_ext.convert(base, mode, seed=0, **({"input_shape": (4,)} if how == "probe at convert" else {}))
    torch.manual_seed(5)
    want = _grads(explicit, x, y)
    torch.manual_seed(5)
    got = _grads(found, x, y)
    assert state_of(found).output_layer == "fc" and state_of(found).output_dim == 3 and _taps(found) == ["fc"]
    assert set(want) == set(got) and {"fc1.weight", "fc2.weight", "fc.weight"} <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for (_, a), (_, b) in zip(bio_ext.feedback_layers(explicit), bio_ext.feedback_layers(found)):
        torch.testing.assert_close(a.feedback, b.feedback, rtol=0, atol=0)


@pytest.mark.parametrize("when", ["convert", "first forward"])
def test_a_model_returning_two_heads_outputs_is_refused_listing_both(when):
    x = torch.randn(6, 4)
    if when == "convert":
        with pytest.raises(errors.AmbiguousOutputError) as exc:
            bio_ext.convert(AuxNet("tuple"), "dfa", input_shape=(4,))
    else:
        model = bio_ext.convert(AuxNet("tuple"), "dfa")
        with pytest.raises(errors.AmbiguousOutputError) as exc:
            model(x)
        with pytest.raises(errors.AmbiguousOutputError):  # and at every forward after it
            model(x)
    for word in ("'fc'", "'aux'", "output_layer="):
        assert word in str(exc.value), word
    chosen = bio_ext.convert(AuxNet("tuple"), "dfa", output_layer="fc", output_key=0, input_shape=(4,))
    assert _grads(chosen, x, torch.randint(0, 3, (6,)))["fc1.weight"].abs().sum() > 0


def test_a_right_guess_is_checked_once_and_an_explicit_output_layer_never():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    guessed = bio_ext.convert(mlp, "dfa")
    assert state_of(guessed).expected_output == "2"
    with torch.no_grad():
        guessed(torch.randn(2, 4))  # no graph, nothing to check yet
    assert state_of(guessed).expected_output == "2"
    guessed(torch.randn(2, 4))
    assert state_of(guessed).expected_output is None and _taps(guessed) == ["2"]
    explicit = bio_ext.convert(mlp, "dfa", output_layer="2")
    assert state_of(explicit).expected_output is None


@pytest.mark.parametrize("options", [{}, {"input_shape": (3, 48, 48)}], ids=["guessed", "probed"])
def test_squeezenet_output_from_a_conv2d_converts_and_trains_a_dfa_step_without_output_layer(options):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = bio_ext.convert(torchvision.models.squeezenet1_0(num_classes=7), "dfa", **options)
    assert state_of(model).output_layer == "" and state_of(model).output_dim == 7
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([1, 5])
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert state_of(model).expected_output is None
    hidden = model.features[0].weight.grad
    assert hidden is not None and torch.isfinite(hidden).all() and hidden.abs().sum() > 0
    opt.step()


@pytest.mark.parametrize("mode", ["dfa", "brsf", "grape"])
@pytest.mark.parametrize("input_shape", [None, (6,)], ids=["first-forward-probe", "convert-probe"])
def test_probe_forwards_leave_the_random_streams_as_they_found_them(mode, input_shape):
    """The probes convert and the first forward run (output layer, weight uses) draw nothing from the user's
    stream: a dropout mask, brsf's redraw and GrAPE's directions at the first real forward are the ones the
    same seed gives a model whose probes already ran."""
    def build():
        torch.manual_seed(0)
        return bio_ext.convert(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 8),
                                             nn.ReLU(), nn.Linear(8, 3)), mode, seed=1, input_shape=input_shape)
    x = torch.randn(4, 6)
    fresh, probed = build(), build()
    probed(x)  # its probes are done (a forward without backward: no feedback update)
    outs, grads, after = [], [], []
    for model in (fresh, probed):
        torch.manual_seed(5)
        out = model(x)
        out.sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        after.append(torch.rand(3))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert len(grads[0]) == len(grads[1]) == 6
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
