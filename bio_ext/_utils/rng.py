"""One way to save and restore the state of the random number generators.

GrAPE's replays, ``bio_ext.alignment`` and the benchmark runner's checkpoints all need it; they
differ only in which generators they cover, which :func:`capture` takes as arguments.
"""

from __future__ import annotations

import math
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


#: CPU draws of at least this many numbers are split between two threads (torch's CPU ``normal_`` runs on one)
PARALLEL_DRAW = 1 << 16
_POOL: Dict[str, Any] = {"pid": None, "pool": None}


def derived_seed(seed: int) -> int:
    """A second seed from ``seed`` (a fixed odd multiplier, mod 2^62), for the generator of :func:`normal`'s
    second thread."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 62)


def _worker():
    import os
    from concurrent.futures import ThreadPoolExecutor
    if _POOL["pid"] != os.getpid():  # none yet, or inherited through fork (its thread is not there)
        _POOL["pool"], _POOL["pid"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bio_ext_draw"), os.getpid()
    return _POOL["pool"]


def normal(shape, dtype: torch.dtype, device, generator: torch.Generator,
           second: Optional[torch.Generator] = None) -> torch.Tensor:
    """Independent standard-normal draws of ``shape``, as ``torch.randn(shape, generator=generator)``; on the CPU,
    with ``second`` and at least :data:`PARALLEL_DRAW` numbers, the first half comes from ``generator`` and the
    second from ``second`` in a worker thread at the same time, in about half the time when torch has two threads
    or more. The same generators give the same draws whatever the number of torch threads (a seeded run does not
    change with ``OMP_NUM_THREADS``)."""
    n = math.prod(shape)
    if second is None or torch.device(device).type != "cpu" or n < PARALLEL_DRAW:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, half = out.view(-1), n // 2
    pending = _worker().submit(flat[half:].normal_, generator=second)
    flat[:half].normal_(generator=generator)
    pending.result()
    return out


_SHIFTS: Dict[torch.device, torch.Tensor] = {}


def rademacher(shape, dtype: torch.dtype, device, generator: torch.Generator) -> torch.Tensor:
    """Independent signs, -1 or +1 with probability 1/2 each, of ``shape``: each random byte gives eight of them
    (one draw of ``ceil(n / 8)`` bytes, then shifts), about twice as fast as ``torch.randn`` on the CPU.
    Like standard normals they have mean 0 and ``E[u u^T] = I``, so a forward gradient from them is unbiased."""
    n = math.prod(shape)
    device = torch.device(device)
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    words = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, device=device, generator=generator)
    bits = (words.unsqueeze(1) >> shifts).bitwise_and_(1).reshape(-1)[:n]
    return bits.to(dtype).mul_(2).sub_(1).reshape(shape)
