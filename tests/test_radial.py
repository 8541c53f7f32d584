"""ConvertConfig.radial (issue 12): what a direct-feedback layer does with the component of its injected signal
along its own input. ``output`` puts there the true gradient's radial component <e_n, z_n>, exact above
positively homogeneous layers; these tests hold it to the formula by hand and to autograd's true gradient."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from bio_ext.functional import output_radial, radial_statistics


def _relu_convnet(bias=False, dropout=0.3):
    """Conv -> ReLU -> MaxPool -> Conv -> ReLU -> Dropout -> Flatten -> Linear -> ReLU -> Linear: positively
    homogeneous above every layer input when bias-free."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.Dropout(dropout), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 6, bias=bias), nn.ReLU(), nn.Linear(6, 5, bias=bias)).double()


X, Y = torch.randn(7, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (7,))
POINTS = (3, 7, 9)  # the converted layers whose input gets an injected gradient


def _input_grads(model, x=X, y=Y, seed=3):
    """The gradient reaching the input of each layer in POINTS, the layers' inputs, the output and its error."""
    seen = {}
    for i in POINTS:
        model[i].register_forward_pre_hook(
            lambda m, a, i=i: a[0].register_hook(lambda g, i=i: seen.__setitem__(i, g)) and None)
        model[i].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0].detach()) and None)
    torch.manual_seed(seed)  # the same dropout mask in every model
    out = model(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    return seen, out.detach(), out.grad


@pytest.mark.parametrize("shape", ["kernel", "dense"])
def test_output_radial_equals_the_formula_by_hand(shape):
    kw = dict(conv_feedback=shape, input_shape=(2, 8, 8), seed=0)
    keep, _, _ = _input_grads(bio_ext.convert(_relu_convnet(), "dfa", radial="keep", **kw))
    seen, z, e = _input_grads(bio_ext.convert(_relu_convnet(), "dfa", radial="output", **kw))
    r, en = (e * z).sum(1), e.norm(dim=1)
    for i in POINTS:
        g0, x = keep[i].reshape(7, -1), seen[("x", i)].reshape(7, -1)
        t = g0 - ((g0 * x).sum(1, keepdim=True) / (x * x).sum(1, keepdim=True)) * x
        hand = t * (en / t.norm(dim=1))[:, None] + (r / (x * x).sum(1))[:, None] * x
        torch.testing.assert_close(seen[i].reshape(7, -1), hand, rtol=1e-12, atol=1e-15)  # float64 throughout


@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_output_radial_component_equals_the_true_gradients_above_homogeneous_layers(mode):
    p = 0.3 if mode == "dfa" else 0.0  # GrAPE seeds its perturbations with a draw that shifts the dropout mask
    true, _, _ = _input_grads(_relu_convnet(dropout=p))
    seen, z, e = _input_grads(bio_ext.convert(_relu_convnet(dropout=p), mode, radial="output", seed=0))
    for i in POINTS:
        x = seen[("x", i)].reshape(7, -1)
        radial_true = (true[i].reshape(7, -1) * x).sum(1)
        torch.testing.assert_close((seen[i].reshape(7, -1) * x).sum(1), radial_true)
        torch.testing.assert_close(radial_true, (e * z).sum(1))  # Euler's identity: the oracle itself
        assert not torch.allclose(seen[i], true[i])  # the rest of the signal is still the feedback's


def test_keep_and_drop_differ_from_output_in_their_radial_part():
    kept, _, _ = _input_grads(bio_ext.convert(_relu_convnet(), "dfa", radial="keep", seed=0))
    dropped, _, _ = _input_grads(bio_ext.convert(_relu_convnet(), "dfa", radial="drop", seed=0))
    for i in POINTS:
        x = dropped[("x", i)].reshape(7, -1)
        torch.testing.assert_close((dropped[i].reshape(7, -1) * x).sum(1), torch.zeros(7, dtype=x.dtype))
        assert (kept[i].reshape(7, -1) * x).sum(1).abs().max() > 1e-6


def test_tokens_share_their_examples_radial_part():
    """A Linear applied to every token: the output has N*T rows; the radial part is per example, summed over its
    tokens, and equals the true gradient's (bias-free ReLU net)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 8, bias=False), nn.ReLU(),
                        nn.Linear(8, 3, bias=False)).double()
    x, y = torch.randn(5, 7, 4, dtype=torch.float64), torch.randint(0, 3, (5 * 7,))
    grads = {}
    for name, model in (("true", net), ("output", bio_ext.convert(net, "dfa", radial="output", seed=0))):
        h = {}
        model[2].register_forward_pre_hook(lambda m, a, h=h: h.__setitem__("x", a[0]) or a[0].retain_grad())
        F.cross_entropy(model(x).reshape(-1, 3), y).backward()
        grads[name] = (h["x"].grad.reshape(5, -1), h["x"].detach().reshape(5, -1))
    (gt, xt), (go, xo) = grads["true"], grads["output"]
    torch.testing.assert_close((go * xo).sum(1), (gt * xt).sum(1))


def test_radial_statistics_refuses_rows_that_do_not_split_into_examples():
    with pytest.raises(errors.FeedbackSignalError, match="radial='drop' or 'keep'"):
        radial_statistics(torch.randn(7, 3), torch.randn(7, 3), 2)


def test_output_radial_leaves_a_zero_input_with_its_tangential_part_at_the_error_norm():
    g, x = torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)
    out = output_radial(g, x, torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("mode,expected", [("dfa", "output"), ("grape", "output"), ("drtp", "keep"),
                                           ("dkp", "keep"), ("fdfa", "keep"), ("pepita", "keep"), ("fa", "keep"),
                                           ("bp", "keep")])
def test_auto_resolves_to_the_modes_default(mode, expected):
    assert bio_ext.ConvertConfig(mode=mode).resolved_radial() == expected
    assert bio_ext.ConvertConfig(mode=mode, tangential=True).resolved_radial() == ("drop" if mode not in ("fa", "bp")
                                                                                   else "keep")


def test_bad_radial_values_are_refused_with_the_fix():
    with pytest.raises(errors.ConfigError, match="radial: 'sideways' is not one of auto, keep, drop, output"):
        bio_ext.ConvertConfig(mode="dfa", radial="sideways")
    with pytest.raises(errors.ConfigError, match="contradicts tangential=True"):
        bio_ext.ConvertConfig(mode="dfa", radial="output", tangential=True)
    cfg = bio_ext.ConvertConfig(mode="grape", radial="drop")
    assert bio_ext.ConvertConfig.from_yaml(cfg.to_yaml()) == cfg


@pytest.mark.parametrize("mode", ["dfa", "grape"])
def test_auto_gives_output_only_when_every_leaf_module_is_positively_homogeneous(mode, caplog):
    relu = bio_ext.convert(_relu_convnet(), mode, seed=0)
    assert bio_ext.state_of(relu).radial == "output"
    torch.manual_seed(0)
    tanh = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with caplog.at_level("INFO", logger="bio_ext.convert"):
        converted = bio_ext.convert(tanh, mode, seed=0)
    assert bio_ext.state_of(converted).radial == "keep"
    assert "not positively homogeneous: 1 (Tanh)" in caplog.text
    assert bio_ext.state_of(bio_ext.convert(tanh, mode, seed=0, radial="output")).radial == "output"


def test_the_resolved_radial_survives_deepcopy_and_pickle():
    import copy
    import pickle
    model = bio_ext.convert(_relu_convnet(), "dfa", seed=0)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert bio_ext.state_of(twin).radial == "output"
        s1, _, _ = _input_grads(twin)
        s0, _, _ = _input_grads(model)
        for i in POINTS:
            torch.testing.assert_close(s1[i], s0[i])


def test_a_model_pickled_before_radial_existed_keeps_the_projection_it_trained_with():
    model = bio_ext.convert(_relu_convnet(), "dfa", seed=0)
    state = bio_ext.state_of(model).__getstate__()
    del state["radial"]
    old = bio_ext.state_of(model).__class__.__new__(bio_ext.state_of(model).__class__)
    old.__setstate__(state)
    assert old.radial == "keep"
    state["config"]["tangential"] = True
    old.__setstate__(state)
    assert old.radial == "drop"
