"""bio_ext.registry: lookups by type and by lazily resolved qualified name, modes and methods in one place."""

import pytest
import torch
import torch.nn as nn

import bio_ext
from bio_ext import registry


class _Sub(nn.Linear):
    """A Linear subclass keeping Linear's forward: converts as a Linear."""


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_subclass_with_the_base_forward_gets_the_base_handler_and_one_with_its_own_forward_none():
    assert registry.handler_for(_Sub(2, 3)) is registry.handler_for(nn.Linear(2, 3)) is not None
    assert registry.handler_for(_OwnForward(2, 3)) is None
    assert registry.output_size(_Sub(2, 3)) == 3 and registry.output_size(nn.ReLU()) is None


def test_transformers_conv1d_is_found_before_any_convert():
    """The handler is registered by qualified name, so asking first (input_gradients on a plain GPT-2)
    sees it; before, it was registered only inside convert()'s planning."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(5, 3)  # nf=5 outputs, nx=3 inputs
    assert registry.handler_for(layer) is not None and registry.output_size(layer) == 5
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), Conv1D(5, 3))
    grads = bio_ext.input_gradients(model, torch.randn(6, 4), torch.randint(0, 5, (6,)))
    assert set(grads) == {"2"}


def test_bwbpf_is_an_available_mode_and_convert_dispatches_it_through_the_registry():
    assert "bwbpf" in bio_ext.available_modes() and "bwbpf" in registry.all_names()
    assert registry.get_method("bwbpf").config_type is bio_ext.BlockwiseConfig
    with pytest.raises(bio_ext.UnknownModeError, match="bwbpf"):
        registry.get_mode("nope")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert bio_ext.blockwise.is_blockwise(bio_ext.convert(model, "bwbpf", blocks=2))


def test_a_mode_name_cannot_be_registered_twice_without_overwrite():
    with pytest.raises(bio_ext.ConfigError, match="registered already"):
        @bio_ext.register_mode("dfa", family="direct")
        class Again(bio_ext.FeedbackRule):
            pass
    assert type(registry.get_mode("dfa").rule).__name__ == "DirectFeedbackAlignment"


def test_qualname_names_a_class_as_configs_do():
    assert registry.qualname(nn.Linear) == "torch.nn.modules.linear.Linear"
