"""The probe forwards ``convert`` runs on a model before (or at) its first real forward: where the output
layer is, which weights are used outside their layer, the grids convolutions see. One place decides what
a probe leaves behind: nothing. Eval mode (no running statistics move, no dropout), training flags put
back, and the random number generators restored, so a mode that draws at every forward (``brsf``) and the
user's own draws see the same stream as without the probe."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from . import rng


def example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Zeros of one example's ``input_shape``, batch 2, on the dtype and device of ``model``'s parameters."""
    param = next(iter(model.parameters()), None)
    return torch.zeros(2, *input_shape, dtype=param.dtype if param is not None else None,
                       device=param.device if param is not None else None)


@contextlib.contextmanager
def quiet_forward(model: nn.Module, grad: Optional[bool] = True) -> Iterator[None]:
    """Run a probe forward of ``model`` inside: eval mode, autograd on (``grad=True``) or off (``False``),
    then training flags and the CPU and CUDA random streams restored."""
    flags = [(m, m.training) for m in model.modules()]
    streams = rng.capture(all_cuda=True)
    try:
        model.eval()
        with torch.set_grad_enabled(grad):
            yield
    finally:
        rng.restore(streams)
        for m, flag in flags:
            m.training = flag
