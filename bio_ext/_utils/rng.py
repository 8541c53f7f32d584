"""One way to save and restore the state of the random number generators.

GrAPE's replays, ``bio_ext.alignment`` and the benchmark runner's checkpoints all need it; they
differ only in which generators they cover, which :func:`capture` takes as arguments.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Optional

import torch


def capture(device: Optional[torch.device] = None, *, all_cuda: bool = False, host: bool = False) -> Dict[str, Any]:
    """The state of torch's CPU generator, plus

    * ``device``'s CUDA generator when ``device`` is a CUDA device;
    * every CUDA generator with ``all_cuda`` (only once CUDA is initialised: capturing must not
      initialise it);
    * Python's ``random`` and NumPy's global generator with ``host`` (a training run's checkpoint).
    """
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda_device"] = (torch.device(device), torch.cuda.get_rng_state(device))
    if all_cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if host:
        import numpy as np
        state["numpy"] = np.random.get_state()
        state["random"] = random.getstate()
    return state


def restore(state: Dict[str, Any]) -> None:
    """Put back what :func:`capture` saved (generators it did not save are left alone)."""
    torch.set_rng_state(state["torch"])
    if "cuda_device" in state:
        device, s = state["cuda_device"]
        torch.cuda.set_rng_state(s, device)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "random" in state:
        random.setstate(state["random"])
