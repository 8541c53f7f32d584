"""GrAPE's feedback step, the maths of part 3 of :mod:`bio_ext.modes.grape`: the mini-batch cosine between a layer's
projected error and its forward-gradient estimate, its gradient with respect to the feedback (in closed form where
the layer's projection has one, :func:`bio_ext.functional.cosine_statistics`), and the update of the feedback."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..functional import cosine_statistics, project_flat, projection_width


def batch_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between two tensors flattened over the whole mini-batch, safe at any scale.

    Each tensor is first divided by its largest magnitude (a constant for autograd: the cosine does not
    depend on it, so the gradient is unchanged). Without that, ``||g||`` of an estimate that grows with
    the logits (about 1e18 and more) overflows float32, and the cosine and its gradient become NaN.
    """
    a, b = a.reshape(-1), b.reshape(-1)
    tiny = torch.finfo(a.dtype).tiny
    a = a / a.detach().abs().amax().clamp_min(tiny)
    b = b / b.detach().abs().amax().clamp_min(tiny)
    return (a @ b) / (a.norm() * b.norm()).clamp_min(tiny)


def projection_kind(layer, info) -> Optional[str]:
    """The closed form of :func:`bio_ext.functional.cosine_statistics` that fits ``layer``'s projection (a
    converted layer's ``projection_kind``; a feedback point's ``e @ B``), None: none (autograd)."""
    kind = getattr(layer, "projection_kind", None)
    if kind is not None:
        return kind(info)
    return "flat" if getattr(type(layer), "project_error", None) is project_flat else None


def scaled_error(e: torch.Tensor, weights: Optional[torch.Tensor], shared: dict):
    """``e`` divided by its largest magnitude, its Gram matrix ``es^T es``, ``diag(ws) es`` and ``ws`` (the row
    weights divided by their largest magnitude; ``es`` and None without weights): the same for every layer of
    one step, so computed once and kept in ``shared`` (keyed by the tensors, which it holds)."""
    key = (id(e), e.dtype, None if weights is None else id(weights))
    hit = shared.get(key)
    if hit is None:
        tiny = torch.finfo(e.dtype).tiny
        base = shared.get((id(e), e.dtype))
        if base is None:
            es = e / e.abs().amax().clamp_min(tiny)
            base = shared[(id(e), e.dtype)] = (e, es, es.t().mm(es))
        _, es, gram = base
        if weights is None:
            hit = (es, gram, es, None, e)
        else:
            ws = weights / weights.abs().amax().clamp_min(tiny)
            hit = (es, gram, es * ws[:, None], ws, weights)
        shared[key] = hit
    return hit[:4]


def cosine_gradient(layer, e: torch.Tensor, g: torch.Tensor, info, weights: Optional[torch.Tensor] = None,
                    shared: Optional[dict] = None):
    """The mini-batch cosine between ``P = layer.project_error(e, B)`` and the estimate ``R`` (``g``, or
    ``weights[:, None] * g``), its gradient with respect to ``B = layer.feedback``, whether the step may use it
    (every input and the gradient finite), and ``g`` as compared (several rows per projection row summed).

    Computed as :func:`batch_cosine` defines it: each side is divided by its largest magnitude first (here
    ``e``, and ``weights`` or ``g``, which scale ``P`` and ``R``), so float32 does not overflow. For the layers
    with a closed form (Linear, Conv2d of every feedback shape, feedback points) the gradient is
    ``grad<P,R> / (||P|| ||R||) - cos grad||P||^2 / (2 ||P||^2)`` with the parts of
    :func:`bio_ext.functional.cosine_statistics`: nothing of ``P``'s size is formed, and ``R`` is not formed
    either when it comes as ``weights`` and ``g``. Other layers: autograd through ``project_error``.
    Non-finite values in ``e``, ``weights`` or ``g`` reach every entry of the gradient (the sums of the closed
    form mix every row, and NaN or inf times anything, zero included, is not finite), so one check of the
    gradient and the cosine covers them all. ``shared``: what the layers of one step share (see
    :func:`scaled_error`)."""
    fb = layer.feedback
    dtype = e.dtype
    tiny = torch.finfo(dtype).tiny
    kind = projection_kind(layer, info)
    if kind is None:
        if weights is not None:
            g = g * weights[:, None]
        with torch.enable_grad():
            b = fb.detach().to(dtype).requires_grad_(True)
            p = layer.project_error(e.detach(), b, info)
            width = p[0].numel()
            if width != g.shape[1]:
                # one error row per example but several positions (tokens) per example at this layer: the
                # projection is spread evenly over them, so the best it can align with is their sum
                g = g.reshape(g.shape[0], -1, width).sum(1)
            cos = batch_cosine(p, g)
            (grad,) = torch.autograd.grad(cos, b)
        return cos.detach(), grad, finite(e, g, grad), g
    width = projection_width(kind, fb, info)
    if width != g.shape[1]:  # several positions (tokens) per example: their sum, as above
        g = g.reshape(g.shape[0], -1, width).sum(1)
    shared = {} if shared is None else shared
    es, gram, er, ws = scaled_error(e, weights, shared)
    if weights is None:
        rs = g / g.abs().amax().clamp_min(tiny)
        gg = rs.reshape(-1).dot(rs.reshape(-1))
    else:
        rs = g
        gg = torch.linalg.vector_norm(g, dim=1).square().dot(ws.square())
    pg, pp, grad_pg, grad_pp = cosine_statistics(kind, es, er, rs, fb.detach(), info, gram=gram)
    norm = (pp.sqrt() * gg.sqrt()).clamp_min(tiny)
    cos = pg / norm
    grad = grad_pg / norm - grad_pp * (cos / (2 * pp).clamp_min(tiny))
    return cos, grad.to(fb.dtype), torch.isfinite(grad).all() & torch.isfinite(cos), g


def finite(*tensors: torch.Tensor) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as a 0-d bool tensor (no device sync)."""
    ok = torch.isfinite(tensors[0]).all()
    for t in tensors[1:]:
        ok = ok & torch.isfinite(t).all()
    return ok


@torch.no_grad()
def apply_steps(steps: Sequence[Tuple[Any, torch.Tensor, torch.Tensor, float, float, Optional[float]]]) -> None:
    """The feedback steps of one backward, ``(layer, grad, ok, lr, momentum, halflife)`` per layer: velocity,
    decayed rate, step, renormalisation to the initial norm, each where its ``ok``; where not (a non-finite error,
    estimate or cosine gradient) every buffer of that layer is left as it was and ``feedback_skips`` counts the batch.

    The layers that share rates, dtype and device are stepped together: one ``torch._foreach_*`` call (or one op on
    their stacked scalars) for each part of the rule instead of one op per layer, which on a CPU is most of the
    step's cost for small feedbacks (resnet18 has 20 layers). Selecting by ``ok`` needs no device sync: on the
    CPU, where reading it costs nothing, a group whose layers are all finite is copied in directly; otherwise
    ``torch.where`` selects layer by layer. A layer that comes more than once (called twice in one forward) has its
    steps applied one after another, in order, as separate calls would."""
    rounds: List[List] = []
    seen: Dict[int, int] = {}
    for step in steps:
        k = seen[id(step[0])] = seen.get(id(step[0]), -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(step)
    if len(rounds) > 1:
        for one in rounds:
            apply_steps(one)
        return
    groups: Dict[Tuple, List] = {}
    for layer, grad, ok, lr, mom, half in steps:
        fb = layer.feedback
        groups.setdefault((lr, mom, half, fb.dtype, fb.device), []).append((layer, grad, ok))
    for (lr, mom, half, dtype, device), items in groups.items():
        layers = [layer for layer, _, _ in items]
        fbs = [layer.feedback for layer in layers]
        vs = [layer.feedback_velocity for layer in layers]
        counts = [layer.feedback_steps for layer in layers]
        ok = torch.stack([o for _, _, o in items])
        norm0 = torch.stack([layer.feedback_norm for layer in layers])
        rate = norm0 * norm0 * lr
        if half is not None:  # decayed with each layer's own step count, a tensor: no device sync
            rate = rate / (torch.stack(counts).to(rate.dtype) / half + 1.0)
        new_v = torch._foreach_lerp(vs, [g.to(v.dtype) for (_, g, _), v in zip(items, vs)], 1 - mom)
        new_fb = torch._foreach_add(fbs, torch._foreach_mul(new_v, list(rate.to(dtype).unbind())))
        norms = torch.stack(torch._foreach_norm(new_fb)).to(dtype)
        torch._foreach_mul_(new_fb, list((norm0.to(dtype) / norms.clamp_min(torch.finfo(dtype).tiny)).unbind()))
        if device.type == "cpu" and bool(ok.all()):
            torch._foreach_copy_(vs, new_v)
            torch._foreach_copy_(fbs, new_fb)
        else:
            for o, v, nv, fb, nfb in zip(ok.unbind(), vs, new_v, fbs, new_fb):
                v.copy_(torch.where(o, nv, v))
                fb.copy_(torch.where(o, nfb, fb))
        torch._foreach_add_(counts, list(ok.to(counts[0].dtype).unbind()))
        skips = [layer.feedback_skips for layer in layers]
        torch._foreach_add_(skips, list((~ok).to(skips[0].dtype).unbind()))


class PendingSteps(list):
    """The feedback steps of one backward, ``(layer, grad, ok, lr, momentum, halflife)`` each, applied together by
    :meth:`flush` (:func:`apply_steps`)."""

    def before(self, layer) -> "PendingSteps":
        """Make way for a step of ``layer``: when it already has one waiting (a layer called twice in one forward),
        apply what waits first, so that its next step is computed from its updated feedback, as when every step was
        applied at once. Returns the list."""
        if any(step[0] is layer for step in self):
            self.flush()
        return self

    def flush(self) -> None:
        apply_steps(self)
        self.clear()
