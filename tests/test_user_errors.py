"""Every user error a typed BioExtError naming the problem and the fix (issue 17, 'crashes where a
typed error belongs'): table-driven over the calls that crashed with raw Python/torch errors."""

import math
import warnings

import pytest
import torch
import torch.nn as nn

import bio_ext
from bio_ext import errors


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


@pytest.mark.parametrize("kwargs, base, words", [
    ({"options": [1, 2]}, TypeError, ["options", "mapping", "list"]),
    ({"options": "x"}, TypeError, ["options", "mapping", "str"]),
    ({"scale": math.inf}, ValueError, ["scale", "finite"]),
    ({"scale": math.nan}, ValueError, ["scale", "finite"]),
    ({"scale": 1e300}, ValueError, ["scale", "overflow"]),
    ({"ouput_dim": 3}, TypeError, ["ouput_dim", "output_dim", "valid"]),
    ({"inplace": "yes"}, TypeError, ["inplace", "True or False"]),
])
def test_bad_convert_arguments_are_typed_errors_naming_the_fix(kwargs, base, words):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.BioExtError) as exc:
        bio_ext.convert(model, "dfa", **kwargs)
    assert isinstance(exc.value, base)
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))
    assert not bio_ext.is_converted(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_typo_in_blockwise_options_names_the_closest_valid_key():
    with pytest.raises(errors.BioExtError) as exc:
        bio_ext.blockwise(_mlp(), blokcs=2)
    assert isinstance(exc.value, TypeError)
    assert "blokcs" in str(exc.value) and "'blocks'" in str(exc.value) and "isolate" in str(exc.value)


def test_an_option_that_does_not_apply_to_the_mode_warns_once():
    """Warned, not refused: one config's convert options are shared by every mode of a sweep."""
    with pytest.warns(UserWarning, match="conv_error") as rec:
        bio_ext.convert(_cnn(), "fa", conv_error="sum")
    assert len([w for w in rec if "conv_error" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bio_ext.convert(_cnn(), "fa")  # defaults say nothing
        bio_ext.convert(_cnn(), "dfa", conv_error="sum")  # applies
