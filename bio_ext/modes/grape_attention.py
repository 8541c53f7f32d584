"""Softmax attention under GrAPE: the primal through PyTorch's fused kernel, the tangent in three products.

PyTorch's fused attention kernels (flash, memory-efficient) have no forward-mode formulas, so a forward that
carries tangents through ``F.scaled_dot_product_attention`` must take the math path: the score matrix, its
softmax and their tangents as a dozen separate kernels, and a backward through all of them (inside macro
blocks, backprop runs there). During a GrAPE forward of a model with attention modules :func:`tangent_attention`
is active instead (a ``TorchFunctionMode`` that sees only that one function: every other call passes straight
through). Where a query, key or value carries a tangent it runs the fused kernel on the primals (the autograd
graph, and the backward, are the fused kernel's own) and gives the output the exact tangent of softmax attention,
computed without a graph from the recomputed probabilities ``P = softmax(S)``, ``S = scale Q K^T + mask``::

    dS = scale (dQ K^T + Q dK^T)
    dO = (P * dS) V - rowsum(P * dS) O + P dV

(``O`` the primal output). Dropout, grouped-query attention and a mask that carries a tangent keep torch's
math path, with its own forward-mode formulas.
"""

from __future__ import annotations

import math
import re
import weakref
from typing import Dict, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention


def attention_tangent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      tq: Optional[torch.Tensor], tk: Optional[torch.Tensor], tv: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                      scale: Optional[float] = None) -> torch.Tensor:
    """The tangent of ``out = scaled_dot_product_attention(q, k, v, attn_mask, is_causal=is_causal,
    scale=scale)`` (no dropout) along the tangents ``tq, tk, tv`` (None: zero), in at least float32."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                  () if attn_mask is None else attn_mask.shape[:-2])
    # as batches of matrices, so each product can scale and accumulate in place (baddbmm): no concatenation,
    # no separate pass for the scale, the difference or the sum
    q, k, v, out = (x.detach().to(dtype).expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
                    for x in (q, k, v, out))
    tq, tk, tv = (None if t is None else t.to(dtype).expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])
                  for t in (tq, tk, tv))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kt = k.transpose(1, 2)
    s = torch.baddbmm(q.new_empty(()), q, kt, beta=0, alpha=scale)
    if is_causal:
        s.masked_fill_(_above_diagonal(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    if attn_mask is not None:
        mask = attn_mask.expand(*lead, *s.shape[-2:]).reshape(s.shape)
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dtype)
    p = torch.softmax(s, dim=-1)
    if attn_mask is not None:
        p = p.nan_to_num_(0.0)  # a row masked out entirely attends to nothing (torch's math path gives it zeros)
    result = None  # at least one of tq, tk, tv is given
    if tq is not None or tk is not None:
        # dS = scale (dQ K^T + Q dK^T), then P * dS
        ds = torch.baddbmm(q.new_empty(()), tq, kt, beta=0, alpha=scale) if tq is not None else None
        if tk is not None:
            ds = torch.baddbmm(q.new_empty(()), q, tk.transpose(1, 2), beta=0, alpha=scale) if ds is None else \
                ds.baddbmm_(q, tk.transpose(1, 2), alpha=scale)
        pds = ds.mul_(p)
        result = torch.baddbmm(out * pds.sum(-1, keepdim=True), pds, v, beta=-1)  # (P * dS) V - rowsum(P * dS) O
    if tv is not None:
        result = torch.bmm(p, tv) if result is None else result.baddbmm_(p, tv)
    return result.reshape(*lead, *result.shape[-2:])


_MASKS: Dict[Tuple[int, int, torch.device], torch.Tensor] = {}


def _above_diagonal(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The positions a causal query may not see (``is_causal``: the upper triangle of ``(rows, cols)``), cached."""
    key = (rows, cols, device)
    mask = _MASKS.get(key)
    if mask is None:
        if len(_MASKS) > 16:
            _MASKS.clear()
        mask = _MASKS[key] = torch.ones(rows, cols, dtype=torch.bool, device=device).triu_(1)
    return mask


def _args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def fused_attention(*args, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` for inputs that may carry forward-mode tangents (see the module
    docstring): the fused kernel for the primal where it can, torch's math path where it cannot."""
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _args(*args, **kwargs)
    duals = [fwAD.unpack_dual(x) if isinstance(x, torch.Tensor) else None for x in (q, k, v, mask)]
    if all(d is None or d.tangent is None for d in duals):
        return _SDPA(*args, **kwargs)
    if dropout_p > 0 or gqa or duals[3] is not None and duals[3].tangent is not None \
            or any(x.layout != torch.strided or x.is_nested for x in (q, k, v)):
        with sdpa_kernel([SDPBackend.MATH]):
            return _SDPA(*args, **kwargs)
    (qp, tq), (kp, tk), (vp, tv) = duals[:3]
    out = _SDPA(qp, kp, vp, attn_mask=mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    with torch.no_grad():
        tangent = attention_tangent(qp, kp, vp, out, tq, tk, tv, mask, is_causal, scale)
    return fwAD.make_dual(out, tangent.to(out.dtype))


class TangentAttention(TorchFunctionMode):
    """While active: ``F.scaled_dot_product_attention`` as :func:`fused_attention`; every other call unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _SDPA:
            return fused_attention(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


#: module class names that suggest a call of scaled_dot_product_attention inside
_ATTENTION_NAME = re.compile(r"attention|attn|mha|sdpa", re.I)
_HAS_ATTENTION: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def has_attention(model: nn.Module) -> bool:
    """Whether some module of ``model`` is named like attention (cached per model)."""
    found = _HAS_ATTENTION.get(model)
    if found is None:
        found = _HAS_ATTENTION[model] = any(_ATTENTION_NAME.search(type(m).__name__) for m in model.modules())
    return found


def tangent_attention(model: nn.Module):
    """The context that a GrAPE forward of ``model`` runs in. Where the model has attention modules (by their class
    names: ``nn.MultiheadAttention``, transformers' ``*Attention``, ...) ``F.scaled_dot_product_attention`` runs as
    :func:`fused_attention`, at the cost of a Python call for every torch call of the forward (about 3 us);
    elsewhere the math backend is chosen for any call of it (the fused kernels would refuse the tangents), at no
    cost per call."""
    return TangentAttention() if has_attention(model) else sdpa_kernel([SDPBackend.MATH])
