"""Finding the tensor in what a module returns (or is called with), and putting a replacement back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

from ..errors import OutputTypeError


def find_output(output: Any, key: Optional[Union[str, int]] = None) -> Tuple[torch.Tensor, Callable]:
    """Locate the output tensor in a model's return value.

    Returns the tensor and a function that puts a replacement back in its place.
    Tensors are used as they are; tuples/lists use ``key`` (an index, default the
    first tensor); mappings and transformers ``ModelOutput`` use ``key`` (default
    ``"logits"``).
    """
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, Mapping):
        return _in_mapping(output, "logits" if key is None else key)
    if isinstance(output, (tuple, list)):
        return _in_sequence(output, key)
    raise OutputTypeError(
        f"the model returned {type(output).__name__}; bio_ext finds the output error on a tensor, a "
        "tuple/list, a dict or a transformers ModelOutput. Return one of those from forward().")


def _in_mapping(output: Mapping, k: Union[str, int]) -> Tuple[torch.Tensor, Callable]:
    value = output.get(k) if isinstance(k, str) else None
    if not isinstance(value, torch.Tensor):
        raise OutputTypeError(
            f"the model returned a {type(output).__name__} without a tensor under {k!r} (keys: "
            f"{list(output.keys())}); pass output_key='<key of the output tensor>' to convert()")

    def put(t, output=output, k=k):
        if hasattr(output, "__dataclass_fields__") and hasattr(output, k):  # transformers ModelOutput
            setattr(output, k, t)
        else:
            output[k] = t
        return output

    return value, put


def _in_sequence(output, key: Optional[Union[str, int]]) -> Tuple[torch.Tensor, Callable]:
    if key is None:
        idx = next((i for i, v in enumerate(output) if isinstance(v, torch.Tensor)), None)
    else:
        idx = key if isinstance(key, int) and -len(output) <= key < len(output) else None
    if idx is None or not isinstance(output[idx], torch.Tensor):
        raise OutputTypeError(
            f"the model returned a {type(output).__name__} with no tensor at {key!r}; pass "
            "output_key=<index of the output tensor> to convert()")

    def put(t, output=output, idx=idx):
        items = list(output)
        items[idx] = t
        if isinstance(output, list):
            return items
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)

    return output[idx], put


def first_tensor(args: tuple, kwargs: dict) -> Tuple[Optional[torch.Tensor], Callable]:
    """The first tensor argument of a call and a function putting a replacement in its place
    (returning the new ``(args, kwargs)``)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return a, lambda t, i=i: ((*args[:i], t, *args[i + 1:]), kwargs)
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], lambda t, key=key: (args, {**kwargs, key: t})
    return None, lambda t: None


def call(model, example: Any):
    """Call ``model`` with ``example``: a mapping as keyword arguments, a tuple as positional ones."""
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def output_tensors(output: Any, key) -> List[Tuple[Any, torch.Tensor]]:
    """``(index or key, tensor)`` of the returned tensors the output layer is looked for in (see
    :mod:`bio_ext.output`): the one ``key`` names; a mapping's ``logits``, else all its tensors; every tensor of
    a tuple or list."""
    if isinstance(output, torch.Tensor):
        return [(0, output)]
    if isinstance(output, Mapping):
        if key is not None or "logits" in output:
            k = "logits" if key is None else key
            return [(k, output[k])] if isinstance(output.get(k), torch.Tensor) else []
        return [(k, v) for k, v in output.items() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        if key is not None:
            ok = isinstance(key, int) and -len(output) <= key < len(output) and isinstance(output[key], torch.Tensor)
            return [(key, output[key])] if ok else []
        return [(i, v) for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
    return []
