"""convert()/revert(): the swap itself, containers, state, selection and bad input."""

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from bio_ext.session import FeedbackSession
from helpers import tanh_mlp, train_steps

ALL_MODES = ["bp", "fa", "dfa", "drtp", "usf", "brsf", "frsf"]


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def snapshot(model):
    return ([type(m) for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            dict(model._forward_hooks), dict(model._forward_pre_hooks))


def assert_untouched(model, snap):
    types, state, hooks, pre = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert dict(model._forward_hooks) == hooks and dict(model._forward_pre_hooks) == pre
    assert not bio_ext.is_converted(model)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_convert_swaps_every_layer_and_reuses_parameters(mode):
    model = small_cnn()
    conv = bio_ext.convert(model, mode, inplace=True)
    assert conv is model
    layers = bio_ext.feedback_layers(conv)
    assert [n for n, _ in layers] == ["0", "3", "6"]
    assert all(isinstance(m, bio_ext.FeedbackLayer) and m.mode == mode for _, m in layers)
    assert all(hasattr(m, "feedback") for _, m in layers)


def test_convert_copies_by_default_and_leaves_model_untouched():
    model = small_cnn()
    snap = snapshot(model)
    conv = bio_ext.convert(model, "dfa")
    assert conv is not model
    assert_untouched(model, snap)
    assert conv[0].weight is not model[0].weight


def test_inplace_conversion_reuses_the_original_parameter_objects():
    model = small_cnn()
    params = [model[0].weight, model[0].bias, model[6].weight]
    conv = bio_ext.convert(model, "fa", inplace=True)
    assert [conv[0].weight, conv[0].bias, conv[6].weight] == params
    assert all(a is b for a, b in zip([conv[0].weight, conv[0].bias, conv[6].weight], params))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_unchanged_training_loop_lowers_the_loss(mode):
    torch.manual_seed(0)
    model = bio_ext.convert(tanh_mlp((10, 32, 32, 3), dtype=torch.float32), mode)
    x = torch.randn(64, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    losses = train_steps(model, x, y, steps=60, lr=0.1)
    assert losses[-1] < 0.8 * losses[0], losses[::10]


@pytest.mark.parametrize("mode", ["bp", "fa", "dfa"])
def test_revert_round_trip_gives_identical_outputs_and_same_parameters(mode):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    conv = bio_ext.convert(model, mode)
    train_steps(conv, x, torch.tensor([1, 2]), steps=2)
    expected = conv(x).detach()
    params = [p for p in conv.parameters()]
    plain = bio_ext.revert(conv, inplace=True)
    assert [type(m) for m in plain.modules()] == [type(m) for m in model.modules()]
    assert all(a is b for a, b in zip(plain.parameters(), params))
    assert torch.equal(plain(x), expected)
    assert not bio_ext.is_converted(plain)
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert set(plain.state_dict()) == set(model.state_dict())
    bio_ext.convert(plain, mode)  # convertible again


def test_revert_of_a_converted_single_layer_root():
    lin = nn.Linear(3, 2)
    fl = bio_ext.convert(lin, "fa")
    back = bio_ext.revert(fl, inplace=True)
    assert type(back) is nn.Linear and back.weight is fl.weight
    copied = bio_ext.revert(fl)
    assert type(copied) is nn.Linear and copied.weight is not fl.weight and torch.equal(copied.weight, fl.weight)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["fa", "dfa"])
def test_revert_returns_a_plain_copy_and_the_model_keeps_training_in_its_mode(mode):
    """Issue 13 item 4: revert has convert's contract; before, the model was silently reverted in place."""
    torch.manual_seed(0)
    conv = bio_ext.convert(small_cnn(), mode, seed=0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4])
    before = _grads(conv, x, y)
    plain = bio_ext.revert(conv)
    assert plain is not conv and bio_ext.is_converted(conv) and not bio_ext.is_converted(plain)
    assert [type(m) for m in plain.modules()] == [type(m) for m in small_cnn().modules()]
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert all(a is not b and torch.equal(a, b) for a, b in zip(plain.parameters(), conv.parameters()))
    torch.testing.assert_close(plain(x), conv(x), rtol=0, atol=0)
    after, true = _grads(conv, x, y), _grads(plain, x, y)
    assert all(torch.equal(a, b) for a, b in zip(after, before))  # still the mode's gradients
    assert not torch.allclose(after[0], true[0])  # first conv: not backprop's
    torch.testing.assert_close(after[-1], true[-1])  # output layer: the true error in both


def test_revert_inplace_reverts_the_model_itself_and_refuses_a_non_bool():
    conv = bio_ext.convert(small_cnn(), "dfa")
    with pytest.raises(errors.ConfigTypeError, match="inplace"):
        bio_ext.revert(conv, inplace="yes")
    assert bio_ext.is_converted(conv)
    with pytest.raises(errors.UnsupportedModuleError):
        bio_ext.revert("model")
    plain = bio_ext.revert(conv, inplace=True)
    assert plain is conv and not bio_ext.is_converted(conv)


@pytest.mark.parametrize("mode", ["fa", "dfa", "frsf"])
def test_state_dict_round_trip_restores_feedback(mode):
    model = small_cnn()
    a = bio_ext.convert(model, mode, seed=1)
    b = bio_ext.convert(model, mode, seed=2)
    assert not torch.equal(a[3].feedback, b[3].feedback)
    assert any(k.endswith("feedback") for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    for (_, la), (_, lb) in zip(bio_ext.feedback_layers(a), bio_ext.feedback_layers(b)):
        for name, buf in la.named_buffers():
            assert torch.equal(buf, getattr(lb, name))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for m in (a, b):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    assert torch.equal(a[0].weight.grad, b[0].weight.grad)


def test_seed_makes_feedback_reproducible():
    model = small_cnn()
    a, b = bio_ext.convert(model, "dfa", seed=7), bio_ext.convert(model, "dfa", seed=7)
    assert torch.equal(a[3].feedback, b[3].feedback)


def test_feedback_is_not_a_copy_of_weights_initialised_from_the_same_seed():
    """torch.manual_seed(s); build; convert(seed=s) must not give FA feedback equal to the initial weights."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    conv = bio_ext.convert(model, "fa", seed=7)
    for i in (0, 2):
        assert conv[i].feedback.shape == conv[i].weight.shape
        assert not torch.allclose(conv[i].feedback, conv[i].weight)


def test_output_dim_is_inferred_from_last_linear():
    conv = bio_ext.convert(small_cnn(), "dfa")
    assert conv[3].feedback.shape == (10, 8, 3, 3)
    assert conv[6].feedback.shape == (10, 128)
    conv = bio_ext.convert(small_cnn(), "dfa", output_dim=10)
    assert conv._bio_ext.output_dim == 10


def test_include_and_exclude_select_layers_by_name_and_type():
    model = small_cnn()
    conv = bio_ext.convert(model, "fa", exclude=["0"])
    assert type(conv[0]) is nn.Conv2d and isinstance(conv[3], bio_ext.FeedbackConv2d)
    conv = bio_ext.convert(model, "fa", include=[nn.Linear])
    assert [n for n, _ in bio_ext.feedback_layers(conv)] == ["6"]
    conv = bio_ext.convert(model, "fa", exclude_types=["Conv2d"])
    assert [n for n, _ in bio_ext.feedback_layers(conv)] == ["6"]
    conv = bio_ext.convert(model, "fa", include=["[03]"])
    assert [n for n, _ in bio_ext.feedback_layers(conv)] == ["0", "3"]


def test_first_layer_pays_no_projection_and_all_projections_are_one_product(monkeypatch):
    widths, products = [], []
    orig = FeedbackSession.receive_error

    def spy(self, e):
        widths.append(list(self.widths))
        orig(self, e)
        products.append(self.proj)

    monkeypatch.setattr(FeedbackSession, "receive_error", spy)
    model = bio_ext.convert(tanh_mlp((6, 7, 5, 4), dtype=torch.float32), "dfa")
    train_steps(model, torch.randn(8, 6), torch.randint(0, 4, (8,)), steps=2)
    assert widths == [[7, 5], [7, 5]]  # layers 2 and 3 only: the first layer's input is data
    # the projections of all layers are slices of one matrix product
    assert products[-1][0]._base is products[-1][1]._base is not None
    # the concatenated feedback is cached across steps (fixed feedback)
    cat1 = model._bio_ext.bank._cat
    train_steps(model, torch.randn(8, 6), torch.randint(0, 4, (8,)), steps=1)
    assert model._bio_ext.bank._cat is cat1


def test_feedback_update_in_place_invalidates_the_cache():
    model = bio_ext.convert(tanh_mlp((6, 7, 5, 4), dtype=torch.float32), "dfa")
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    train_steps(model, x, y, steps=1)
    with torch.no_grad():
        model[2].feedback.mul_(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert torch.count_nonzero(model[0].weight.grad) == 0


Out = collections.namedtuple("Out", "logits aux")


class Wrap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.net = tanh_mlp((6, 8, 4), dtype=torch.float32)

    def forward(self, x):
        out = self.net(x)
        return {"tensor": lambda: out, "tuple": lambda: (out, x.sum()), "list": lambda: [x.sum(), out],
                "dict": lambda: {"logits": out, "hidden": x}, "namedtuple": lambda: Out(out, 1),
                "str": lambda: "nope"}[self.kind]()


@pytest.mark.parametrize("output_layer", [None, ""], ids=["tap-output-layer", "tap-return-value"])
@pytest.mark.parametrize("kind,key", [("tensor", None), ("tuple", None), ("list", 1), ("dict", None),
                                      ("namedtuple", None)])
def test_dfa_finds_the_output_in_containers(kind, key, output_layer):
    model = bio_ext.convert(Wrap(kind), "dfa", output_key=key, output_layer=output_layer, output_dim=4)
    out = model(torch.randn(3, 6))
    logits = out if kind == "tensor" else (out["logits"] if kind == "dict" else out[1 if kind == "list" else 0])
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert model.net[0].weight.grad is not None and torch.isfinite(model.net[0].weight.grad).all()
    if kind == "namedtuple":
        assert isinstance(out, Out)


def test_dfa_with_transformers_model_output():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import SequenceClassifierOutput

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp((6, 8, 4), dtype=torch.float32)

        def forward(self, x):
            return SequenceClassifierOutput(logits=self.net(x))

    model = bio_ext.convert(M(), "dfa")
    out = model(torch.randn(3, 6))
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()
    assert torch.isfinite(model.net[0].weight.grad).all()
    assert out["logits"] is out.logits


# ----------------------------------------------------------------------------- bad input
def test_unknown_mode_lists_valid_modes_and_leaves_model_untouched():
    model = small_cnn()
    snap = snapshot(model)
    with pytest.raises(errors.UnknownModeError) as exc:
        bio_ext.convert(model, "dfaa", inplace=True)
    assert isinstance(exc.value, ValueError)
    for m in ALL_MODES:
        assert m in str(exc.value)
    assert_untouched(model, snap)


def test_nothing_to_convert():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(errors.NothingToConvertError, match="nn.Linear"):
        bio_ext.convert(model, "fa", inplace=True)
    with pytest.raises(errors.NothingToConvertError):
        bio_ext.convert(small_cnn(), "fa", include=["nope*"])


def test_output_size_that_cannot_be_found():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3))
    snap = snapshot(model)
    # no Linear: the last Conv2d is taken as the output layer, with the error at the return value (issue 17);
    # this model's output is a feature map, whose last dimension the forward names
    with pytest.raises(errors.OutputDimError, match="output_dim=1"):
        bio_ext.convert(model, "dfa")(torch.randn(2, 3, 5, 5))
    with pytest.raises(errors.OutputDimError, match="output_dim="):
        bio_ext.convert(model, "dfa", output_layer="", inplace=True)
    assert_untouched(model, snap)
    bio_ext.convert(model, "fa")  # local modes need no output size


def test_output_size_mismatch_is_reported_at_forward():
    model = bio_ext.convert(tanh_mlp((6, 8, 4), dtype=torch.float32), "dfa", output_dim=5)
    with pytest.raises(errors.OutputDimError, match="output_dim=4"):
        model(torch.randn(2, 6))


class OwnWeightAttention(nn.Module):
    """An attention module bio_ext does not know: its forward uses its own weight tensor."""

    def __init__(self, d=8):
        super().__init__()
        self.qkv_weight = nn.Parameter(torch.randn(3 * d, d) / d ** 0.5)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv_weight).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v)


def test_unknown_attention_is_refused_with_the_fix_and_model_untouched():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)  # known: expanded, then rolled back
            self.att = OwnWeightAttention()
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.att(self.mha(x, x, x)[0]))

    model = Att()
    snap = snapshot(model)
    with pytest.raises(errors.UnsupportedModuleError, match="exclude") as exc:
        bio_ext.convert(model, "dfa", inplace=True)
    assert isinstance(exc.value, TypeError) and "att (OwnWeightAttention" in str(exc.value)
    assert "register_expander" in str(exc.value)
    assert_untouched(model, snap)
    assert type(model.mha) is nn.MultiheadAttention
    conv = bio_ext.convert(model, "dfa", exclude=["att"])
    assert [n for n, _ in bio_ext.feedback_layers(conv)] == ["mha.in_proj", "mha.out_proj", "head"]


def test_converting_twice_is_refused():
    conv = bio_ext.convert(small_cnn(), "fa")
    with pytest.raises(errors.AlreadyConvertedError, match="revert"):
        bio_ext.convert(conv, "dfa")


def test_unrecognised_output_type_is_a_clear_error():
    model = bio_ext.convert(Wrap("str"), "dfa", output_dim=4, output_layer="")
    with pytest.raises(errors.OutputTypeError, match="tensor"):
        model(torch.randn(2, 6))


def test_dict_output_without_logits_names_output_key():
    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.l(x)}

    model = bio_ext.convert(D(), "dfa", output_layer="", output_dim=2)
    with pytest.raises(errors.OutputTypeError, match="output_key"):
        model(torch.randn(2, 3))
    out = bio_ext.convert(D(), "dfa", output_key="scores", output_layer="", output_dim=2)(
        torch.randn(2, 3, requires_grad=True))
    out["scores"].sum().backward()
    out = bio_ext.convert(D(), "dfa")(torch.randn(2, 3, requires_grad=True))  # default: tap the Linear
    out["scores"].sum().backward()


def test_output_layer_that_does_not_exist_is_named():
    with pytest.raises(errors.ConversionError, match="nope"):
        bio_ext.convert(small_cnn(), "dfa", output_layer="nope")


def test_loss_computed_inside_forward_still_delivers_the_error():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tanh_mlp((6, 8, 4), dtype=torch.float32)

        def forward(self, x, y):
            logits = self.net(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

    model = bio_ext.convert(WithLoss(), "dfa")
    model(torch.randn(3, 6), torch.tensor([0, 1, 2]))["loss"].backward()
    assert torch.isfinite(model.net[0].weight.grad).all()


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        bio_ext.convert(lambda x: x, "fa")


def test_bad_options_are_reported_together():
    with pytest.raises(errors.ConfigError) as exc:
        bio_ext.convert(small_cnn(), "dfa", output_dim=-1, init="zeros", scale=0)
    assert len(exc.value.problems) == 3


def test_loss_not_computed_from_output_is_a_clear_error():
    model = bio_ext.convert(tanh_mlp((6, 8, 8, 4), dtype=torch.float32), "dfa")
    model(torch.randn(2, 6))
    hidden = model[0](torch.randn(2, 6))  # outside the root's forward: first layer, fine
    with pytest.raises(errors.FeedbackSignalError):
        model[2](hidden).sum().backward()


def test_deepcopy_and_pickle_of_converted_model_still_train(tmp_path):
    model = bio_ext.convert(small_cnn(), "dfa")
    clone = copy.deepcopy(model)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    train_steps(clone, x, y, steps=1)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    train_steps(loaded, x, y, steps=1)
    assert bio_ext.is_converted(loaded)
    bio_ext.revert(clone, inplace=True)
    assert not bio_ext.is_converted(clone)
    train_steps(model, x, y, steps=1)  # the original still works


def test_eval_and_no_grad_forward_match_training_forward():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    conv = bio_ext.convert(model, "dfa")
    with torch.no_grad():
        assert torch.equal(conv(x), model(x))
    assert torch.allclose(conv(x), model(x))


def test_user_forward_hooks_survive_conversion():
    model = small_cnn()
    seen = []
    model[6].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    conv = bio_ext.convert(model, "dfa")
    conv(torch.randn(2, 3, 8, 8))
    assert seen == [torch.Size([2, 10])]
