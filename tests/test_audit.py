"""convert says which parameterised modules it leaves on plain backprop (issue 17, item 2): one warning
naming each with why, strict=True refusing them, normalisation layers and embeddings expected, weight
tying reported, an exclude pattern that matches nothing warned, bp mode silent."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors


class Custom(nn.Module):
    """Calls F.linear on a weight of its own."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, h):
        return F.linear(h, self.w)


class Net(nn.Module):
    def __init__(self, odd):
        super().__init__()
        self.fc1, self.odd, self.fc2 = nn.Linear(4, 8), odd, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


ODD = [
    (lambda: nn.LSTM(8, 8), "LSTM", "recurrent"),
    (lambda: nn.GRU(8, 8), "GRU", "recurrent"),
    (lambda: nn.RNN(8, 8), "RNN", "recurrent"),
    (lambda: nn.Conv1d(2, 2, 3), "Conv1d", "convolution type"),
    (lambda: nn.Conv3d(2, 2, 3), "Conv3d", "convolution type"),
    (lambda: nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d", "convolution type"),
    (lambda: nn.Bilinear(8, 8, 3), "Bilinear", "bilinear"),
    (Custom, "Custom", "(w)"),
]


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("make, kind, why", ODD, ids=[k for _, k, _ in ODD])
def test_a_module_left_on_backprop_is_warned_once_refused_by_strict_and_silenced_by_exclude(make, kind, why, caplog):
    with pytest.warns(errors.BioExtWarning) as rec:
        bio_ext.convert(Net(make()), "dfa")
    msgs = [str(w.message) for w in rec if "backprop" in str(w.message)]
    assert len(msgs) == 1 and f"odd ({kind}: " in msgs[0] and why in msgs[0] and "exclude" in msgs[0], msgs
    assert any("odd" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    model = Net(make())
    with pytest.raises(errors.StrictConversionError) as exc:
        bio_ext.convert(model, "fa", strict=True, inplace=True)
    assert isinstance(exc.value, ValueError) and not bio_ext.is_converted(model)
    for word in ("'fa'", "odd", kind, "exclude=", "strict=False"):
        assert word in str(exc.value), word
    _quiet(lambda: bio_ext.convert(Net(make()), "dfa", exclude=["odd"], strict=True))
    _quiet(lambda: bio_ext.convert(Net(make()), "bp", strict=True))


class Additive(nn.Module):
    """A ViT-style class token and position embedding, and a scale: additive or elementwise parameters."""

    def __init__(self):
        super().__init__()
        self.class_token, self.pos_embedding = nn.Parameter(torch.zeros(1, 1, 8)), nn.Parameter(torch.zeros(1, 5, 8))
        self.scale = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(8), lambda: nn.LayerNorm(8), lambda: nn.GroupNorm(2, 8),
                                  lambda: nn.Embedding(10, 8), lambda: nn.PReLU(), Additive],
                         ids=["batchnorm", "layernorm", "groupnorm", "embedding", "prelu", "additive"])
def test_normalisation_layers_and_embeddings_are_expected_to_stay_and_not_warned(make):
    _quiet(lambda: bio_ext.convert(Net(make()), "dfa", strict=True))


class Tied(nn.Module):
    """``dec`` is converted; ``reader`` uses its weight through F.linear in its own forward (tying)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 8), nn.Linear(8, 3)
        self.reader = nn.Module()
        self.reader.weight = self.dec.weight

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.dec(h) + F.linear(h, self.reader.weight)


def test_a_converted_layer_whose_weight_another_module_uses_is_reported():
    with pytest.warns(errors.BioExtWarning, match=r"dec \(its weight is also a parameter of reader"):
        bio_ext.convert(Tied(), "dfa")
    with pytest.raises(errors.StrictConversionError, match="reader"):
        bio_ext.convert(Tied(), "dfa", strict=True)


@pytest.mark.parametrize("kwargs, word", [({"exclude": ["fc9"]}, "exclude='fc9'"),
                                          ({"exclude_types": ["Conv2d"]}, "exclude_types='Conv2d'")])
def test_an_exclude_that_matches_nothing_is_warned_naming_it(kwargs, word):
    with pytest.warns(errors.BioExtWarning, match="matches no module") as rec:
        bio_ext.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), "dfa", **kwargs)
    assert any(word in str(w.message) for w in rec)


def test_strict_is_a_validated_config_field_that_round_trips():
    cfg = bio_ext.ConvertConfig(mode="fa", strict=True)
    assert bio_ext.ConvertConfig.from_dict(cfg.to_dict()) == cfg == bio_ext.ConvertConfig.from_yaml(cfg.to_yaml())
    with pytest.raises(errors.ConfigError, match="strict"):
        bio_ext.ConvertConfig(strict="yes")
    with pytest.raises(errors.StrictConversionError):
        bio_ext.convert(Net(nn.LSTM(8, 8)), cfg)


class Foreign(nn.Module):
    """Its forward calls ``F.linear`` on a weight of a module it holds outside the module tree."""

    def __init__(self, layer):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: its weight is not registered here

    def forward(self, h):
        return F.linear(h, self.layer.weight)


class Borrower(nn.Module):
    """fc2's weight is used by ``where``: the root's forward (``"root"``) or a sibling module (``"foreign"``)."""

    def __init__(self, where):
        super().__init__()
        self.where = where
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.foreign = Foreign(self.fc2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = torch.tanh(self.fc2(h) + (F.linear(h, self.fc2.weight) if self.where == "root" else self.foreign(h)))
        return self.out(h)


USES = [(where, mode, probe) for where, caller in (("root", "<root>"), ("foreign", "foreign"))
        for mode in ("dfa", "fa", "grape") for probe in ("convert", "first forward")]


@pytest.mark.parametrize("where, mode, probe", USES, ids=["-".join(c) for c in USES])
def test_a_weight_used_outside_its_layer_is_found_by_a_probe_warned_marked_and_refused_by_strict(where, mode, probe):
    caller = "<root>" if where == "root" else "foreign"
    kw = {"input_shape": (4,)} if probe == "convert" else {}
    x = torch.randn(5, 4)
    with pytest.warns(errors.BioExtWarning, match="used outside their own forward") as rec:
        model = bio_ext.convert(Borrower(where), mode, **kw)
        model(x).sum().backward()
    msgs = [str(w.message) for w in rec if "outside their own forward" in str(w.message)]
    assert len(msgs) == 1 and f"fc2 (used by {caller} (linear)" in msgs[0] and "fc1" not in msgs[0], msgs
    assert (probe == "first forward") == ("first forward" in msgs[0])
    assert model.fc2.weight_used_outside == (f"{caller} (linear)",) and model.out.weight_used_outside == ()
    assert "weight also used outside this layer by" in repr(model.fc2)
    _quiet(lambda: model(x).sum().backward())  # said once
    plain = Borrower(where)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(errors.StrictConversionError, match=r"fc2 \(used by"):
        bio_ext.convert(plain, mode, strict=True, inplace=True, **kw)(x)
    if probe == "convert":  # refused before anything is swapped
        assert type(plain.fc2) is nn.Linear and all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("mode", ["dfa", "fa", "grape"])
def test_a_model_using_each_weight_in_its_own_layer_is_not_warned_at_its_first_forward(mode):
    model = _quiet(lambda: bio_ext.convert(Net(nn.Identity()), mode))
    with warnings.catch_warnings():
        warnings.simplefilter("error", errors.BioExtWarning)
        model(torch.randn(5, 4)).sum().backward()
    assert all(layer.weight_used_outside == () for _, layer in bio_ext.feedback_layers(model))
