"""GrAPE's extra tangent directions (``directions`` K > 1, see :mod:`bio_ext.modes.grape`): K - 1 replays of the
forward that carry tangents only, and the converted layers' products they reuse from the real forward."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .._utils import rng
from ..session import FeedbackSession, activate, reset


def replay(session, make_state: Callable[[], object]) -> None:
    """Run K - 1 more forwards of ``session``'s module under no_grad, each with tangents only.

    Each replays the forward with the global RNG state it started from (the same dropout masks) and fresh
    perturbations from the forward's own generator (``make_state()``: the replay's rule state, tied to the real
    forward); BatchNorm running statistics are restored afterwards, and so is the global RNG, so the model and the
    user's random stream see one forward. Each replay's (perturbations, output tangent) is appended to the real
    forward's ``replays``.
    """
    fwd = session.rule_state
    module, args, kwargs, start, directions, device = fwd.replay
    after = rng.capture(device)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [dict(m._buffers) for m in norms]
    for m in norms:  # replays update copies: the originals are saved for the real backward, untouched
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()
    try:
        with torch.no_grad():
            for _ in range(directions - 1):
                rng.restore(start)
                again = FeedbackSession(session.bank, session.output_dim, session.rule, tangent_only=True)
                again.rule_state = make_state()
                token = activate(again)
                try:
                    module.forward(*args, **kwargs)
                finally:
                    reset(token)
                fwd.replays.append((again.rule_state.perturbations, again.rule_state.out_tangent))
    finally:
        for m, bufs in zip(norms, saved):
            m._buffers.update(bufs)
        rng.restore(after)


def primal_output(session, layer, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A converted Linear or Conv2d's output for input ``x``: in a replay, the real forward's, not recomputed.

    A replay runs the same function on the same inputs with the same RNG state, so each converted layer's product
    is the one the real forward computed; only the tangent product is new. Reusing it saves the replay its primal
    products (the elementwise ops between layers still run). The real forward records ``(layer, input shape,
    output)`` in call order (when it will be replayed: ``primals`` is a list); a replay takes them in the same
    order and computes the product itself from the first call that does not match (another layer, or an input of
    another shape) on. Checked against recomputing in tests/test_grape.py."""
    fwd = session.rule_state
    if fwd is None:
        return compute()
    if session.tangent_only:
        if fwd.main is None:  # not a replay (convert's probe of the output)
            return compute()
        cache = fwd.main.rule_state.primals
        hit = cache[fwd.cursor_primal] if cache is not None and fwd.cursor_primal < len(cache) else None
        if hit is None or hit[0] is not layer or hit[1] != x.shape:
            fwd.cursor_primal = 1 << 62  # out of step with the real forward: compute from here on
            return compute()
        fwd.cursor_primal += 1
        return hit[2]
    out = compute()
    if fwd.primals is not None:
        fwd.primals.append((layer, x.shape, out.detach()))
    return out
