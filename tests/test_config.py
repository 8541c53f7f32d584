"""ConvertConfig: validation reports every problem, and round-trips to dict and YAML."""

import pytest

import bio_ext
from bio_ext import ConvertConfig, errors


def test_config_round_trips_through_dict_and_yaml():
    cfg = ConvertConfig(mode="dfa", output_dim=10, init="xavier", scale=0.5, exclude=("fc",),
                        include_types=("Linear",), seed=3, options={"a": 1})
    assert ConvertConfig.from_dict(cfg.to_dict()) == cfg
    assert ConvertConfig.from_yaml(cfg.to_yaml()) == cfg


def test_config_reports_every_problem_at_once():
    with pytest.raises(errors.ConfigError) as exc:
        ConvertConfig(mode="nope", output_dim=0, init="zeros", scale=-1, conv_error="max", seed="x")
    assert len(exc.value.problems) == 6
    msg = str(exc.value)
    for word in ("mode", "output_dim", "init", "scale", "conv_error", "seed"):
        assert word in msg


def test_unknown_keys_are_named():
    with pytest.raises(errors.ConfigError, match="modee"):
        ConvertConfig.from_dict({"modee": "dfa"})


def test_config_is_frozen():
    cfg = ConvertConfig()
    with pytest.raises(Exception):
        cfg.mode = "fa"


def test_convert_accepts_a_config():
    import torch.nn as nn
    model = bio_ext.convert(nn.Linear(3, 2), ConvertConfig(mode="fa", seed=1))
    assert model.mode == "fa"


@pytest.fixture
def scratch_modes():
    """Modes registered by a test are removed after it, so other tests see the built-in set."""
    from bio_ext import registry
    before = set(registry.mode_names())
    yield
    for name in set(registry.mode_names()) - before:
        registry.remove_mode(name)


def test_register_mode_adds_a_mode_by_rule(scratch_modes):
    import torch
    import torch.nn as nn

    @bio_ext.register_mode("half_fa_test", family="local", overwrite=True)
    class HalfFA(bio_ext.FeedbackRule):
        def effective(self, layer):
            return layer.feedback * 0.5

    assert "half_fa_test" in bio_ext.available_modes()
    lin = bio_ext.convert(nn.Linear(4, 3).double(), "half_fa_test")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, dtype=torch.float64)
    lin(x).backward(g)
    torch.testing.assert_close(x.grad, g @ (0.5 * lin.feedback))
    with pytest.raises(errors.ConfigError, match="registered already"):
        bio_ext.register_mode("half_fa_test", family="local")(HalfFA)


def test_shipped_configs_parse_and_convert():
    from pathlib import Path

    import torch.nn as nn
    paths = sorted((Path(__file__).parent.parent / "configs").glob("convert_*.yaml"))
    assert paths
    for path in paths:
        cfg = ConvertConfig.from_yaml(path.read_text())
        model = bio_ext.convert(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), cfg)
        assert model[0].mode == cfg.mode
