"""GrAPE's attention tangent (bio_ext/modes/grape_attention.py, issue 16): the fused kernel for the primal and the
three-product tangent give what torch's math path with forward AD gives, for every mask kind and every subset of
tangents; what the fast path does not cover keeps the math path; and a whole GPT-2 with ``sdpa`` attention, through
these and the plain-layer tangent rules, still gives a forward gradient that sums to the true one over a basis."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import bio_ext
from bio_ext.modes import grape_attention, grape_norm
from helpers import assert_point_estimates_sum_to_true, grape_output_tangents

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

L, S = 5, 7


def _masks():
    torch.manual_seed(3)
    keep = torch.rand(L, S) > 0.3
    keep[1] = False  # a query row that sees nothing
    return {"none": {}, "causal": {"is_causal": True}, "scale": {"scale": 0.3}, "bool": {"attn_mask": keep},
            "float": {"attn_mask": torch.randn(L, S, dtype=torch.float64)},
            "float_broadcast": {"attn_mask": torch.randn(2, 1, L, S, dtype=torch.float64)}}


def _qkv(which, e=4, ev=6):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64) for n, d in ((L, e), (S, e), (S, ev)))
    tangents = [torch.randn_like(x) if w else None for x, w in zip((q, k, v), which)]
    return (q, k, v), tangents


def _both(which, kwargs):
    """(torch's math path with forward AD, the fused path) for one call: each an (output, tangent) pair."""
    (q, k, v), tangents = _qkv(which)
    with fwAD.dual_level():
        duals = [x if t is None else fwAD.make_dual(x, t) for x, t in zip((q, k, v), tangents)]
        with sdpa_kernel([SDPBackend.MATH]):
            ref = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, **kwargs))
        with grape_attention.TangentAttention():
            got = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, **kwargs))
    return ref, got


@pytest.mark.parametrize("mask", list(_masks()))
@pytest.mark.parametrize("which", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)],
                         ids=lambda w: "t_" + "".join("qkv"[i] for i in range(3) if w[i]))
def test_fused_tangent_equals_torchs_math_path_forward_ad(mask, which):
    ref, got = _both(which, _masks()[mask])
    torch.testing.assert_close(got.primal, ref.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tangent, ref.tangent, rtol=1e-10, atol=1e-12)


def _node_names(node, depth=3) -> str:
    if node is None or depth == 0:
        return ""
    return type(node).__name__ + " " + " ".join(_node_names(n, depth - 1) for n, _ in node.next_functions)


def test_float32_primal_is_the_fused_kernels_and_its_gradient_is_backprops():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    tq = torch.randn(2, 2, 16, 8)
    with fwAD.dual_level(), grape_attention.TangentAttention():
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, v, is_causal=True)
        primal, tangent = fwAD.unpack_dual(out)
    assert "Flash" in _node_names(primal.grad_fn)  # the fused kernel's own backward
    grads = torch.autograd.grad(primal.square().sum(), (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for g, r in zip(grads, torch.autograd.grad(plain.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.func.jvp(lambda x: F.scaled_dot_product_attention(x, k.detach(), v.detach(), is_causal=True),
                             (q.detach(),), (tq,))[1]
    torch.testing.assert_close(tangent, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"dropout_p": 0.5}, {"enable_gqa": True}], ids=["dropout", "gqa"])
def test_what_the_fast_path_does_not_cover_keeps_torchs_math_path(kwargs, monkeypatch):
    calls = []
    monkeypatch.setattr(grape_attention, "attention_tangent", lambda *a, **k: calls.append(1))
    (q, k, v), (tq, _, _) = _qkv((1, 0, 0))
    with fwAD.dual_level(), grape_attention.TangentAttention():
        torch.manual_seed(0)
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, v, **kwargs)
        with sdpa_kernel([SDPBackend.MATH]):
            torch.manual_seed(0)
            ref = F.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, v, **kwargs)
        assert not calls
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(ref).tangent)


def test_the_mode_passes_every_other_call_through_and_primal_attention_untouched(monkeypatch):
    calls = []
    monkeypatch.setattr(grape_attention, "attention_tangent", lambda *a, **k: calls.append(1))
    (q, k, v), _ = _qkv((0, 0, 0))
    with grape_attention.TangentAttention():
        out = F.scaled_dot_product_attention(q, k, v)
        summed = torch.add(q, 1.0).sum()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(summed, (q + 1).sum())
    assert not calls


def _gpt2_and_true_block_gradients():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).double()
    for m in model.modules():  # LayerNorms that are not the identity at initialisation
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    ids = torch.randint(0, 16, (1, 4))
    ref, outs = copy.deepcopy(model), {}
    hooks = [ref.transformer.h[i].register_forward_hook(
        lambda m, a, o, i=i: outs.__setitem__(i, o if isinstance(o, torch.Tensor) else o[0])) for i in range(2)]
    true = torch.autograd.grad(ref(input_ids=ids, labels=ids).loss, [outs[0], outs[1]])
    for h in hooks:
        h.remove()
    conv = bio_ext.convert(model, "grape", granularity="macro", options={"feedback_lr": 0.0, "keep_estimate": True})
    return conv, ids, true


def test_gpt2_sdpa_forward_gradient_sums_to_the_true_gradient_over_a_basis(monkeypatch):
    """As tests/test_transformers.py's basis test, with ``sdpa`` attention: the block outputs' estimates, with the
    perturbation running over the standard basis, sum to the true gradient exactly; so every tangent on the way
    (the fused attention's, LayerNorm's, ``Conv1D``'s, ``NewGELUActivation``'s rules) is exact."""
    used = {"attention": 0, "rules": set()}
    tangent, rule_for = grape_attention.attention_tangent, grape_norm.rule_for
    monkeypatch.setattr(grape_attention, "attention_tangent",
                        lambda *a, **k: used.__setitem__("attention", used["attention"] + 1) or tangent(*a, **k))
    monkeypatch.setattr(grape_norm, "rule_for", lambda m: used["rules"].add(type(m).__name__) or rule_for(m))
    conv, ids, true = _gpt2_and_true_block_gradients()
    assert_point_estimates_sum_to_true(monkeypatch, conv, ids, true)
    assert used["attention"] > 0 and {"LayerNorm", "Conv1D", "NewGELUActivation"} <= used["rules"]


class _Encoder(torch.nn.Module):
    def __init__(self, e=8, heads=2, classes=3):
        super().__init__()
        self.inp = torch.nn.Linear(4, e)
        self.att = torch.nn.MultiheadAttention(e, heads, batch_first=True)
        self.norm = torch.nn.LayerNorm(e)
        self.out = torch.nn.Linear(e, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = self.norm(h + self.att(h, h, h, need_weights=False, is_causal=False)[0])
        return self.out(h.mean(1))


@pytest.mark.parametrize("granularity", ["layer", "macro"])
def test_converted_multihead_attention_carries_the_math_paths_output_tangent(monkeypatch, granularity):
    """nn.MultiheadAttention as bio_ext converts it (its projections converted, scaled_dot_product_attention
    between them): a GrAPE forward's output tangent with the fused path equals the one through torch's math path."""
    torch.manual_seed(0)
    net = _Encoder().double()
    torch.nn.init.uniform_(net.norm.weight, 0.5, 1.5)
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    calls, tangent = [], grape_attention.attention_tangent
    monkeypatch.setattr(grape_attention, "attention_tangent", lambda *a, **k: calls.append(1) or tangent(*a, **k))
    points = {"points": ["inp", "att"]} if granularity == "macro" else {}
    tangents = grape_output_tangents(monkeypatch, net, x, y, lambda mp: mp.setattr(
        grape_attention, "tangent_attention", lambda model: sdpa_kernel([SDPBackend.MATH])), granularity=granularity,
        **points)
    assert len(calls) == 1 and tangents[0].abs().max() > 0
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


def test_a_model_without_attention_modules_runs_without_the_mode_and_any_attention_call_takes_the_math_path():
    """The mode costs a Python call per torch call: a model with no module named like attention gets the math
    backend instead, so an attention call hidden in another module still carries its tangent (more slowly)."""
    class Mixer(torch.nn.Module):  # attention inside a module whose name does not say so
        def __init__(self):
            super().__init__()
            self.inp, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            return self.out(F.scaled_dot_product_attention(h, h, h).mean(1))

    modes = []
    real = grape_attention.tangent_attention
    for net, expected in ((Mixer(), False), (_Encoder(), True)):
        grape_attention._HAS_ATTENTION.clear()
        model = bio_ext.convert(net, "grape", seed=0)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grape_attention, "tangent_attention",
                       lambda m: (lambda ctx: modes.append(type(ctx)) or ctx)(real(m)))
            F.cross_entropy(model(torch.randn(4, 5, 4)), torch.randint(0, 3, (4,))).backward()
        assert (modes[-1] is grape_attention.TangentAttention) is expected
    assert all(p.grad is not None for p in model.parameters())
