"""bio_ext under ``torch.distributed``: DistributedDataParallel in every mode, and GrAPE's feedback kept
identical on every rank.

Wrap a converted (or block-wise) model in PyTorch's own ``DistributedDataParallel`` as any other model::

    torch.distributed.init_process_group("gloo")           # or "nccl"; torchrun sets the environment
    model = bio_ext.convert(model, "dfa", seed=0)          # the same seed on every rank: the same feedback
    model = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn(model(x_shard), y_shard).backward()            # DDP averages the gradients, as for backprop

What holds (tested with 2 gloo ranks in ``tests/test_distributed.py``):

* ``pepita``: its weight updates are sums over examples of per-example terms (each example's two passes), so
  DDP's average of the shards' updates is the whole batch's, as for backprop (tested). With
  ``weight_mirroring`` each rank draws its own mirror noise, and DDP's ``broadcast_buffers=True`` (its default)
  gives every rank rank 0's mirror matrices at the next forward (not tested under DDP).
* ``dkp`` and ``fdfa``: their feedback learns in the backward from sums over the batch (``e^T h``; the
  Jacobian estimate ``t^T u / N``); under DDP each step averages them over the ranks with one ``all_reduce``
  (:func:`reduce_tensors` over :func:`feedback_group`), so the feedback is bit-identical on every rank and
  equals a single process on the concatenated batch (fdfa: with the ranks' perturbations; tested).
* ``bp``, ``fa``, ``usf``, ``brsf``, ``frsf``, ``dfa``, ``drtp`` and ``bwbpf``: every rank's gradient is linear
  in its shard's output error (the projection ``e @ B`` with a fixed ``B``, or the transported one), so with
  equal shards and a mean-reduced loss the all-reduced gradient equals the single-process gradient of the
  whole batch. The feedback tensors are buffers: DDP broadcasts them from rank 0 at construction (and, with
  ``broadcast_buffers=True``, at every forward), so all ranks start from rank 0's. ``brsf`` redraws its
  magnitudes at every forward from the global RNG: seed every rank alike (``torch.manual_seed``) or each
  shard trains with another draw (the average of several brSF gradients, not brSF's). ``bwbpf`` with
  ``early_backward=True`` is refused under DDP (its local backward runs inside the forward, where DDP
  cannot reduce the gradients).
* ``grape``: the feedback learns inside the backward, from the output error and the forward-gradient
  estimate. Under DDP every step all-reduces what the step consumes (the mini-batch cosine's numerator
  ``<P, g>``, the squared norms ``||P||^2`` and ``||g||^2``, the gradients of the first two with respect to
  the feedback, and a count of non-finite inputs: one flat float64 tensor for all layers, one
  ``all_reduce`` per step), so the step is that of the **global** batch's cosine: the feedback, its
  velocity and its step count are identical on every rank (bit for bit), equal (to float tolerance) to a
  single process stepping on the concatenated batch with the same perturbations, and DDP's
  ``broadcast_buffers=True`` (its default) broadcasts values every rank already holds instead of discarding
  the other ranks' updates. Each rank draws its perturbations from a stream of its own (the forward's seed,
  drawn from the global RNG, mixed with the rank in the group): perturbations are per-example noise, and
  a single process draws a fresh one for every example, so ranks sharing one stream would give the
  examples at the same position of every shard the same direction (correlated estimates).

Which process group. By default (``"auto"``) GrAPE synchronises exactly when its forward runs inside a
``DistributedDataParallel`` forward that wraps the model, over that DDP's ``process_group``, and only when
that group has more than one rank. Elsewhere (a single process, a copy of the model trained on one rank, a
probe) nothing is communicated. :func:`sync_feedback` chooses another group (e.g. for a model trained with
hand-written gradient all-reduces) or turns the synchronisation off (each rank then steps from its own
shard; with ``broadcast_buffers=True`` DDP keeps rank 0's feedback, with ``False`` the ranks drift apart).
Layers whose ``feedback_lr`` is 0 communicate nothing either (their ``grape_cos`` is their shard's).

The all-reduce runs in the backward when the output error arrives, on the same group as DDP's gradient
buckets (every rank runs the same graph, so every rank issues the collectives in the same order). It runs
once per forward, as a single process steps once per
forward: inside ``ddp.no_sync()`` (gradient accumulation) the feedback still synchronises at every micro-batch.
Exactness needs equal shards (each rank's error carries its own ``1/N_r`` of a mean-reduced loss), as for
DDP's gradient average.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import ConfigError, Problem

#: the default setting of :func:`sync_feedback`: the process group of the DDP forward the model runs in
AUTO = "auto"

_SETTINGS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()

#: mixed with a rank to give every rank of a group its own perturbation stream (the 64-bit golden ratio)
_RANK_STRIDE = 0x9E3779B97F4A7C15


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        return inner
    return model


def sync_feedback(model: nn.Module, group: Union[str, None, bool, Any] = AUTO) -> nn.Module:
    """Choose how ``model``'s learning feedback (GrAPE) is synchronised across processes; returns ``model``.

    ``model`` is the converted model or the ``DistributedDataParallel`` wrapping it. ``group``:

    * ``"auto"`` (the default): the ``process_group`` of the DDP forward the model runs in, when it has more
      than one rank; nothing outside a DDP forward;
    * a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all ranks): that group, in
      every forward with gradients, DDP or not (every rank of it must run the same steps);
    * ``None`` or ``False``: never (every rank steps its feedback from its own shard).

    Kept for the module object: a copy (``copy.deepcopy``, a reloaded pickle) starts at ``"auto"`` again.
    """
    root = _unwrap(model)
    if not isinstance(root, nn.Module):
        raise ConfigError([Problem("model", f"expects the converted model (or its DDP wrapper), got "
                                            f"{type(model).__name__}")], what="bio_ext.distributed.sync_feedback")
    if group is True:
        group = AUTO
    if group is None or group is False:
        _SETTINGS[root] = False
    elif isinstance(group, str):
        if group != AUTO:
            raise ConfigError([Problem("group", f"'auto', None/False or a torch.distributed process group, got "
                                                f"{group!r}")], what="bio_ext.distributed.sync_feedback")
        _SETTINGS.pop(root, None)
    else:
        _SETTINGS[root] = group
    return model


def _active_ddp() -> Any:
    ddp_type = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_type is None:
        return None
    get = getattr(ddp_type, "_get_active_ddp_module", None)
    return get() if get is not None else getattr(ddp_type, "_active_ddp_module", None)


def feedback_group(module: nn.Module) -> Any:
    """The process group ``module``'s feedback steps are synchronised over in a forward that starts now, or
    None (see :func:`sync_feedback`). Called by GrAPE when the forward opens."""
    setting = _SETTINGS.get(module, AUTO)
    if setting is False:
        return None
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    if isinstance(setting, str):  # auto
        ddp = _active_ddp()
        if ddp is None:
            return None
        inner = getattr(ddp, "module", None)
        if inner is not module and not (isinstance(inner, nn.Module) and any(m is module for m in inner.modules())):
            return None
        group = ddp.process_group
    else:
        group = setting
    if dist.get_world_size(group) < 2:
        return None
    return group


def group_rank(group: Any) -> int:
    return torch.distributed.get_rank(group)


def rank_seed(seed: int, rank: int) -> int:
    """The perturbation seed of ``rank`` for a forward whose seed (drawn from the global RNG) is ``seed``."""
    return (seed + rank * _RANK_STRIDE) % (2 ** 62)


def all_reduce_sum(flat: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``flat`` over ``group`` (in place, synchronously) and return it."""
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    return flat


def reduce_tensors(tensors: Sequence[torch.Tensor], group: Any, *, mean: bool = False) -> List[torch.Tensor]:
    """``tensors`` summed (``mean``: averaged) over ``group`` with one ``all_reduce`` of one flat tensor (in the
    widest of their dtypes), each returned in its own shape and dtype; ``group`` None: returned as they are.

    The building block for a mode whose feedback learns from the batch: reduce what its update consumes, once
    per step, over :func:`feedback_group` of the converted model (``session.owner``)."""
    if group is None or not tensors:
        return list(tensors)
    wide = tensors[0].dtype
    for t in tensors[1:]:
        wide = torch.promote_types(wide, t.dtype)
    flat = all_reduce_sum(torch.cat([t.detach().reshape(-1).to(wide) for t in tensors]), group)
    if mean:
        flat = flat / torch.distributed.get_world_size(group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


def global_cosine(items: Sequence[Tuple[Any, torch.Tensor, torch.Tensor, Any]],
                  group: Any) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GrAPE's mini-batch cosine and its gradient with respect to the feedback, over the global batch of
    ``group``, for every ``(layer, e, g, info)`` of one step: ``(grad, cos, ok, g)`` per layer (``g`` the estimate
    as compared, ``ok`` whether every rank's inputs were finite), after one ``all_reduce``.

    The cosine ``<P, g> / (||P|| ||g||)`` with ``P = layer.project_error(e, B)`` linear in ``B`` has three parts,
    each a sum over examples, so its gradient on the concatenated batch is
    ``grad<P,g> / (||P|| ||g||) - cos grad||P||^2 / (2 ||P||^2)`` of the sums over ranks. Each rank computes its
    parts divided by its largest magnitudes (as :func:`bio_ext.modes.grape.batch_cosine`, so float32 does not
    overflow), scales them back in float64 (exact up to about 1e150) and adds a count of non-finite inputs:
    one flat float64 tensor for all layers, summed over ``group``."""
    wide = torch.float64
    parts, pending = [], []
    for layer, e, g, info in items:
        fb = layer.feedback
        dtype = torch.promote_types(e.dtype, fb.dtype)
        e, g = e.to(dtype), g.to(dtype)
        tiny = torch.finfo(dtype).tiny
        with torch.enable_grad(), torch.autocast(e.device.type, enabled=False):
            b = fb.detach().to(dtype).requires_grad_(True)
            p = layer.project_error(e.detach(), b, info)
            width = p[0].numel()
            if width != g.shape[1]:  # several positions (tokens) per example: their sum (GrAPE's step())
                g = g.reshape(g.shape[0], -1, width).sum(1)
            sp, sg = p.detach().abs().amax().clamp_min(tiny), g.abs().amax().clamp_min(tiny)
            a, c = (p / sp).reshape(-1), (g / sg).reshape(-1)
            (grad_ac,) = torch.autograd.grad(a, b, c, retain_graph=True)  # grad <a, c>
            (grad_aa,) = torch.autograd.grad(a, b, 2 * a.detach())  # grad ||a||^2
        spw, sgw = sp.to(wide), sg.to(wide)
        a = a.detach()
        finite = torch.isfinite(e).all() & torch.isfinite(g).all() & torch.isfinite(grad_ac).all() \
            & torch.isfinite(grad_aa).all()
        stats = torch.stack([(a @ c).to(wide) * (spw * sgw), (a @ a).to(wide) * (spw * spw),
                             (c @ c).to(wide) * (sgw * sgw), (~finite).to(wide)])
        parts += [grad_ac.reshape(-1).to(wide) * (spw * sgw), grad_aa.reshape(-1).to(wide) * (spw * spw), stats]
        pending.append((fb.shape, b.numel(), dtype, g))
    flat = all_reduce_sum(torch.cat(parts), group)
    out, offset, tiny = [], 0, torch.finfo(wide).tiny
    for shape, size, dtype, g in pending:
        grad_pg, grad_pp = flat[offset:offset + size], flat[offset + size:offset + 2 * size]
        pg, pp, gg, bad = flat[offset + 2 * size:offset + 2 * size + 4].unbind()
        offset += 2 * size + 4
        cos = pg / (pp * gg).sqrt().clamp_min(tiny)
        grad = grad_pg / (pp * gg).sqrt().clamp_min(tiny) - grad_pp * (cos / (2 * pp.clamp_min(tiny)))
        grad = grad.reshape(shape).to(dtype)
        out.append((grad, cos.to(dtype), (bad == 0) & torch.isfinite(grad).all(), g))
    return out
