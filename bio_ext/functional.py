"""Pure tensor math shared by the autograd Functions. No autograd, no modules."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import FeedbackSignalError

_aten_conv_bwd = torch.ops.aten.convolution_backward


def autocast_inputs(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The inputs of a converted layer's op as autocast would give them to ``F.linear``/``F.conv2d``.

    torch's custom-op guide has a Function whose op autocast casts declare ``cast_inputs`` (a
    ``torch.amp.custom_fwd``); that decorator is bound to one device type, and the converted layers run on any,
    so the layers cast here, before ``apply``, with the same rule: inside an autocast region of the first
    tensor's device, every floating tensor that is not float64 goes to the region's dtype (bf16 on CPU, fp16 or
    bf16 on CUDA). The Function then sees one dtype in its forward and backward (its saved input, weight and
    ``grad_output`` agree, so no matmul or oneDNN convolution mixes dtypes), and the weight's gradient reaches
    the fp32 parameter through the cast's own backward, in the parameter's dtype, as for torch's own layers.
    Outside autocast the tensors are returned as they are.
    """
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
                 else t for t in tensors)


def project_flat(e: torch.Tensor, feedback: torch.Tensor, info=None) -> torch.Tensor:
    """The error ``e`` (``N x D``) projected with a feedback of ``D`` rows: ``e @ B.reshape(D, -1)``."""
    return e.mm(feedback.reshape(feedback.shape[0], -1))


def linear_param_grads(grad_out: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool,
                       transposed: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Weight and bias gradients of ``y = x @ W.T + b`` for any number of leading dims; with
    ``transposed`` (weight stored ``(in, out)``, transformers Conv1D: ``y = x @ W + b``) the weight
    gradient comes in that stored layout."""
    g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    gw = (x2.t().mm(g2) if transposed else g2.t().mm(x2)) if need_w else None
    gb = g2.sum(0) if need_b else None
    return gw, gb


def conv2d_param_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding,
                       dilation, groups: int, need_w: bool, need_b: bool
                       ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Weight and bias gradients of ``F.conv2d`` from ``grad_out``, without the input gradient."""
    if not (need_w or need_b):
        return None, None
    _, gw, gb = _aten_conv_bwd(grad_out, x, weight, [weight.shape[0]] if need_b else None,
                               stride, padding, dilation, False, [0, 0], groups,
                               (False, need_w, need_b))
    return gw, gb


def conv2d_input_grad(grad_out: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor, stride, padding,
                      dilation, groups: int) -> torch.Tensor:
    """Transposed convolution of ``grad_out`` with ``kernel``: the input gradient of conv2d
    when ``kernel`` stands in for the weight (FA's rule for Conv2d)."""
    return _aten_conv_bwd(grad_out, x, kernel, None, stride, padding, dilation, False, [0, 0], groups,
                          (True, False, False))[0]


def coverage_matrix(in_size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int,
                    device=None, dtype=None) -> torch.Tensor:
    """``M[i, h] = 1`` iff kernel tap ``i`` of some output position reads input row ``h``.

    With it, the transposed convolution of an error that is constant over the
    output grid factorises: see :func:`spread_projection`.
    """
    m = torch.zeros(kernel, in_size, device=device, dtype=dtype)
    pos = torch.arange(out_size) * stride - padding
    for i in range(kernel):
        p = pos + i * dilation
        p = p[(p >= 0) & (p < in_size)]
        m[i, p.to(m.device)] = 1
    return m


def spread_projection(p: torch.Tensor, spread: Tuple) -> torch.Tensor:
    """Map a per-tap projection ``p`` of shape ``(N, C*kh*kw)`` onto the input grid.

    ``spread`` is ``(C, kh, kw, my, mx, scale)`` as a Conv2d layer caches it. Returns
    ``scale * sum_ij p[n, c, i, j] * my[i, h] * mx[j, w]``, which equals
    ``conv_transpose2d`` of the error broadcast over the output grid with the
    kernel-shaped feedback (``p = e @ B.reshape(D, -1)``), in two small matmuls.
    """
    channels, kh, kw, my, mx, scale = spread
    n, h, w = p.shape[0], my.shape[1], mx.shape[1]
    # one product with the (kh kw, H W) matrix my (x) mx: many tiny (kh, W) products in a bmm are slow
    out = p.reshape(n * channels, kh * kw).mm(spread_matrix(spread, p.dtype)).reshape(n, channels, h, w)
    if scale != 1.0:
        out = out * scale
    return out


def spread_matrix(spread: Tuple, dtype: torch.dtype) -> torch.Tensor:
    """``K[(i, j), (h, w)] = my[i, h] mx[j, w]`` (``kron(my, mx)``, ``(kh kw, H W)``) of a kernel-shaped spread: the
    spread of one channel's taps onto the grid is ``taps @ K`` (:func:`spread_projection`)."""
    return torch.kron(spread[3].to(dtype), spread[4].to(dtype))


def conv_padding(module) -> Tuple[Optional[Tuple[int, int, int, int]], str, Tuple[int, int]]:
    """How to run a Conv2d module as ``F.pad`` then a convolution with symmetric padding.

    Returns ``(pad, pad_mode, conv_padding)``: ``pad`` is the ``F.pad`` argument
    (None when the convolution can pad by itself), ``pad_mode`` its mode.
    """
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            sym = (0, 0)
            explicit = None
        else:  # 'same' (stride 1 is enforced by nn.Conv2d)
            th, tw = dh * (kh - 1), dw * (kw - 1)
            top, left = th // 2, tw // 2
            explicit = (left, tw - left, top, th - top)
            sym = (0, 0)
            if module.padding_mode == "zeros" and th % 2 == 0 and tw % 2 == 0:
                explicit, sym = None, (top, left)
    else:
        ph, pw = module.padding
        explicit, sym = None, (ph, pw)
        if module.padding_mode != "zeros" and (ph or pw):
            explicit, sym = (pw, pw, ph, ph), (0, 0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return explicit, mode, sym


def pad_input(x: torch.Tensor, pad: Optional[Sequence[int]], mode: str) -> torch.Tensor:
    if pad is None:
        return x
    return F.pad(x, tuple(pad), mode=mode)


def targets_from_error(error: torch.Tensor, who: str, fix: str) -> torch.Tensor:
    """Class targets from a softmax cross-entropy output error ``(N, C)``: each row's negative entry.

    ``e_n = (softmax(z_n) - onehot(y_n)) * c`` (``c > 0`` for any reduction or class weight) is
    negative at the target class only, so the target is the row's argmin. Rows that are all zero
    (``ignore_index``, padding) get ``-100``. A row with no negative entry means the loss is not
    cross-entropy: :class:`~bio_ext.errors.FeedbackSignalError` naming ``who`` and ``fix``.
    """
    e = error.detach()
    valid = e.ne(0).any(dim=1)
    mins, idx = e.min(dim=1)
    bad = valid & ~(mins < 0)
    if bool(bad.any()):
        raise FeedbackSignalError(
            f"{who} recovers the targets from the output error, which is exact for softmax cross-entropy; "
            f"{int(bad.sum())} row(s) of the error have no negative entry, so the loss is not cross-entropy. {fix}")
    return torch.where(valid, idx, torch.full_like(idx, -100))


def fit_rows(p: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """Reshape a ``(N, K)`` projection onto a layer input of ``shape`` (last dim K).

    Exact when the input has N rows; when the input has more positions per example
    than the output (e.g. tokens before a pooled classifier), the projection is
    spread evenly over them (the adjoint of mean pooling).
    """
    n = p.shape[0]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    if rows == n:
        return p.reshape(shape)
    if len(shape) >= 3 and shape[0] == n and rows % n == 0:
        r = rows // n
        view = p.reshape((n,) + (1,) * (len(shape) - 2) + (shape[-1],))
        return (view / r).expand(shape)
    raise FeedbackSignalError(
        f"{what}: the output error has {n} rows but this layer's input {tuple(shape)} has {rows}; "
        "direct feedback needs one error row per input row (or per example, with the batch as the "
        "first dimension). Exclude this layer from conversion or use a local mode such as 'fa'.")


# --------------------------------------------------------------------------- conv feedback shapes

#: the convolution feedback shapes of the direct family (``convert(..., conv_feedback=...)``)
CONV_FEEDBACK = ("kernel", "dense", "factored")


def conv_feedback_elements(shape: str, output_dim: int, channels: int, kh: int, kw: int, height: int,
                           width: int) -> int:
    """Number of entries of one layer's direct feedback ``B`` for each conv feedback shape.

    ``kernel``: ``D C kh kw``; ``dense``: ``D C H W`` (``H x W`` the padded input grid);
    ``factored``: ``D (C + H W)``. GrAPE keeps a velocity of the same size beside it.
    """
    if shape == "kernel":
        return output_dim * channels * kh * kw
    if shape == "dense":
        return output_dim * channels * height * width
    if shape == "factored":
        return output_dim * (channels + height * width)
    raise ValueError(f"unknown conv feedback shape {shape!r}; valid: {', '.join(CONV_FEEDBACK)}")


def factored_projection(e: torch.Tensor, feedback: torch.Tensor, channels: int, height: int,
                        width: int) -> torch.Tensor:
    """``P[n, c, h, w] = sum_d e[n, d] Bc[d, c] Bs[d, h, w]`` without materialising ``B``.

    ``feedback`` is ``(D, C + H W)``: ``Bc = feedback[:, :C]``, ``Bs = feedback[:, C:]`` (one tensor,
    so GrAPE steps both factors through the product). Cost ``N D C H W`` multiply-adds (as the dense
    product) and ``N D C`` extra memory; ``B`` itself (``D C H W``) is never formed.
    """
    n = e.shape[0]
    bc, bs = feedback[:, :channels].to(e.dtype), feedback[:, channels:].to(e.dtype)
    y = e.unsqueeze(2) * bc.unsqueeze(0)  # (N, D, C)
    return torch.matmul(y.transpose(1, 2), bs).reshape(n, channels, height, width)


def conv_projection(p: torch.Tensor, info: Tuple) -> torch.Tensor:
    """Map a layer's slice ``p`` of the session's product onto a convolution's (padded) input grid.

    ``info`` is what the layer registered: the kernel shape's spread tuple (see
    :func:`spread_projection`), ``("dense", C, H, W)`` (``p = e @ B.reshape(D, -1)``, reshaped) or
    ``("factored", C, H, W, feedback)`` (``p`` is the error itself: see :func:`factored_projection`).
    """
    tag = info[0]
    if tag == "dense":
        return p.reshape(p.shape[0], *info[1:4])
    if tag == "factored":
        return factored_projection(p, info[4], *info[1:4])
    return spread_projection(p, info)


def tangential(g: torch.Tensor, x: torch.Tensor, lead: int = 1) -> torch.Tensor:
    """``g`` without its component along ``x``, separately for each index of the first ``lead`` dims:
    ``g_n - (<g_n, x_n> / ||x_n||^2) x_n`` (``x_n = 0`` leaves ``g_n`` as it is).

    Applied to a direct-feedback layer's injected input gradient (``ConvertConfig.radial="drop"``): a step
    along the result changes the direction of each example's activity at the layer input but, to first
    order, not its norm, which fixed random feedback otherwise grows without limit (see BENCHMARKS.md,
    "Deep networks: what grows under DFA").
    """
    rows = 1
    for s in g.shape[:lead]:
        rows *= s
    g2, x2 = g.reshape(rows, -1), x.detach().reshape(rows, -1).to(g.dtype)
    return tangential_rows(g2, x2, torch.finfo(g.dtype).tiny)[0].reshape(g.shape)


def tangential_rows(g2: torch.Tensor, x2: torch.Tensor, tiny: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``g2`` without its component along the same row of ``x2`` (2-d tensors of one shape), and the
    squared row norms of ``x2`` (a column, at least ``tiny``) it divided by: two passes over ``x2``, one over ``g2``,
    one temporary (the result)."""
    xx = squared_row_norms(x2).clamp_min_(tiny)
    return torch.addcmul(g2, x2, row_dots(g2, x2).div_(xx).neg_()), xx


def squared_row_norms(a: torch.Tensor) -> torch.Tensor:
    """``||a_n||^2`` of each row of a 2-d tensor, as a column ``(N, 1)``: one pass over ``a``, no temporary of its
    size (as ``(a * a).sum(1)`` has)."""
    return torch.linalg.vector_norm(a, dim=1, keepdim=True).square_()


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a_n, b_n>`` of each row of two 2-d tensors of one shape, as a column ``(N, 1)``: a batched product, one
    pass over both, no temporary of their size (as ``(a * b).sum(1)`` has)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0], 1)


def radial_statistics(e: torch.Tensor, z: torch.Tensor, examples: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per example: ``r_n = <e_n, z_n>`` and ``||e_n||``, from the output error ``e`` and the output ``z``
    (both ``rows x D``; the rows of one example, e.g. its tokens, are summed). ``r_n`` is the exact radial
    component ``<g_n, x_n>`` of the true gradient ``g`` at any layer input ``x`` whose map to the output is
    positively homogeneous of degree 1 (ReLU, max/average pooling, dropout, bias-free linear maps: then
    ``J x = z`` by Euler's identity, so ``<J^T e, x> = <e, z>``)."""
    dtype = torch.promote_types(e.dtype, torch.float32)
    e32, z32 = e.detach().to(dtype), z.detach().to(dtype).reshape(e.shape)
    r = (e32 * z32).sum(1)
    en = (e32 * e32).sum(1)
    if r.shape[0] != examples:
        if r.shape[0] % examples:
            raise FeedbackSignalError(
                f"radial='output': the output has {r.shape[0]} rows, not a multiple of the {examples} examples "
                "at a layer's input; use radial='drop' or 'keep' for this model")
        r, en = r.reshape(examples, -1).sum(1), en.reshape(examples, -1).sum(1)
    return r, en.sqrt()


def output_radial(g: torch.Tensor, x: torch.Tensor, r: torch.Tensor, en: torch.Tensor) -> torch.Tensor:
    """A direct-feedback signal ``g`` with the true gradient's scale behaviour restored, example by example
    (the first dim of ``g`` and ``x``; ``r``, ``en`` from :func:`radial_statistics`)::

        t_n   = g_n - (<g_n, x_n> / ||x_n||^2) x_n            # the random direction, without its radial part
        out_n = ||e_n|| t_n / ||t_n||  +  (r_n / ||x_n||^2) x_n

    The radial part is the one the true gradient has above a positively homogeneous net
    (:func:`radial_statistics`): a step then grows an example's activity only while that lowers the loss and
    shrinks it when the logits overshoot, which a fixed random ``g`` (or its tangential part alone) cannot
    do. The tangential part is put at the error's norm, the true gradient's norm under a norm-preserving
    initialisation, so that the two parts are in the true gradient's proportion. Computed in float32 at least.
    """
    n = g.shape[0]
    dtype = torch.promote_types(g.dtype, torch.float32)
    g2, x2 = g.reshape(n, -1).to(dtype), x.detach().reshape(n, -1).to(dtype)
    tiny = torch.finfo(dtype).tiny
    # four passes over the activations' size and one temporary (t), where the plain formula takes ten and seven
    # (timed in BENCHMARKS.md, "GrAPE's speed, fifth round")
    t, xx = tangential_rows(g2, x2, tiny)
    tn = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    scale = torch.where(tn > 0, en.reshape(n, 1).to(dtype) / tn.clamp_min(tiny), torch.zeros_like(tn))
    return t.mul_(scale).addcmul_(x2, r.reshape(n, 1).to(dtype) / xx).reshape(g.shape).to(g.dtype)


# --------------------------------------------------------------------------- GrAPE's cosine in closed form

#: the projections :func:`cosine_statistics` has a closed form for (a layer's ``projection_kind``)
PROJECTION_KINDS = ("flat", "kernel", "factored")


def adjoint_spread(r: torch.Tensor, spread: Tuple, k: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The adjoint of :func:`spread_projection`: a ``(N, C, H, W)`` tensor (any ``(N, C*H*W)`` view) onto the
    per-tap space ``(N, C*kh*kw)``, ``scale * my @ r[n, c] @ mx^T`` (``r[n, c] @ K^T`` flattened; ``k``: the
    :func:`spread_matrix` in ``r``'s dtype when the caller has it)."""
    channels, kh, kw, my, mx, scale = spread
    n = r.shape[0]
    k = spread_matrix(spread, r.dtype) if k is None else k
    out = r.reshape(n * channels, -1).mm(k.t())
    if scale != 1.0:
        out = out * scale
    return out.reshape(n, -1)


def cosine_statistics(kind: str, e: torch.Tensor, er: torch.Tensor, r: torch.Tensor, feedback: torch.Tensor,
                      info=None, gram: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``<P, R>``, ``||P||^2`` and their gradients with respect to the feedback ``B``, in closed form, for the
    projection ``P = project(e, B)`` of a layer of ``kind`` (``"flat"``: ``e @ B.reshape(D, -1)``, a Linear's and
    a dense convolution's; ``"kernel"``: :func:`spread_projection` of it, ``info`` the spread; ``"factored"``:
    :func:`factored_projection`, ``info`` the layer's ``("factored", C, H, W, feedback)``).

    ``R`` is ``diag(w) r`` (``r``: ``(N, width)``, one row per row of ``e``) and ``er`` is ``diag(w) e``, so a
    per-row weight (GrAPE's directional derivatives) is never spread over ``r``. Nothing of ``P``'s size is
    formed: ``<P, R> = <B, M>`` with ``M = er^T A(r)`` (``A`` the adjoint of the spatial map: identity for flat,
    :func:`adjoint_spread` for kernel), and ``||P||^2 = <B, G B S>`` with ``G = e^T e`` (``D x D``) and ``S`` the
    spatial map's Gram operator (identity; ``scale^2 (my my^T) . (mx mx^T)`` on each channel's taps). For the
    factored shape ``B = [Bc | Bs]``, ``<P, R> = sum_d Bc_d^T M_d Bs_d`` with ``M = er^T r`` as ``(D, C, H W)`` and
    ``||P||^2 = sum(G * (Bc Bc^T) * (Bs Bs^T))``. Returns ``(pg, pp, grad_pg, grad_pp)``, the gradients in
    ``feedback``'s shape; the gradients of ``autograd`` through the projection, in float64 to rounding
    (tests/test_functional.py). ``gram``: ``e^T e`` when the caller has it.
    """
    d = feedback.shape[0]
    b = feedback.reshape(d, -1).to(e.dtype)
    gram = e.t().mm(e) if gram is None else gram  # (D, D)
    if kind == "factored":
        channels = info[1]
        bc, bs = b[:, :channels], b[:, channels:]
        m = er.t().mm(r).reshape(d, channels, bs.shape[1])  # (D, C, HW)
        grad_c = torch.bmm(m, bs.unsqueeze(2)).squeeze(2)  # M_d Bs_d: (D, C)
        grad_s = torch.bmm(bc.unsqueeze(1), m).squeeze(1)  # Bc_d^T M_d: (D, HW)
        pg = (grad_c * bc).sum()
        cc, ss = bc.mm(bc.t()), bs.mm(bs.t())
        pp = (gram * cc * ss).sum()
        grad_pp = torch.cat([(gram * ss).mm(bc), (gram * cc).mm(bs)], dim=1) * 2
        return pg, pp, torch.cat([grad_c, grad_s], dim=1).reshape(feedback.shape), grad_pp.reshape(feedback.shape)
    if kind == "kernel":
        channels, kh, kw, my, mx, scale = info
        k = spread_matrix(info, e.dtype)
        m = er.t().mm(adjoint_spread(r, info, k.to(r.dtype)))  # (D, C kh kw)
        bsb = b.reshape(d * channels, kh * kw).mm(k.mm(k.t())).reshape(d, -1)  # S's Gram: (kh kw, kh kw)
        gbs = gram.mm(bsb) * (scale * scale)
    elif kind == "flat":
        m = er.t().mm(r.reshape(r.shape[0], -1))
        gbs = gram.mm(b)
    else:
        raise ValueError(f"no closed form for projection kind {kind!r}; valid: {', '.join(PROJECTION_KINDS)}")
    pg, pp = (b * m).sum(), (b * gbs).sum()
    return pg, pp, m.reshape(feedback.shape), (gbs * 2).reshape(feedback.shape)


def projection_width(kind: str, feedback: torch.Tensor, info=None) -> int:
    """Entries per row of a layer's projection ``P`` (its input's, per example or token)."""
    if kind == "flat":
        return feedback[0].numel()
    if kind == "kernel":
        return info[0] * info[3].shape[1] * info[4].shape[1]
    return info[1] * info[2] * info[3]
