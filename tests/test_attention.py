"""nn.MultiheadAttention replaced by ExplicitMultiheadAttention: same function, same parameters."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.attention import ExplicitMultiheadAttention
from helpers import grads, set_feedback_to_weights

E, H = 8, 2
MHA_CASES = {
    "default": dict(),
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "kdim_vdim": dict(kdim=6, vdim=5),
    "kdim_vdim_batch_first": dict(kdim=6, vdim=5, batch_first=True),
}
CALLS = {
    "weights": dict(),
    "per_head_weights": dict(average_attn_weights=False),
    "no_weights": dict(need_weights=False),
    "key_padding_mask": dict(key_padding_mask="kpm"),
    "float_attn_mask": dict(attn_mask="float"),
    "bool_attn_mask_no_weights": dict(attn_mask="bool", need_weights=False),
    "causal": dict(attn_mask="causal", is_causal=True, need_weights=False),
}
INPUTS = ["self", "cross", "key_is_value", "unbatched"]


def _inputs(kw, kind, L=4, S=4, N=3):
    kd, vd = kw.get("kdim", E), kw.get("vdim", E)
    if kind == "unbatched":
        return torch.randn(L, E), torch.randn(S, kd), torch.randn(S, vd)
    if kind == "self" and kd == E and vd == E:
        q = torch.randn(L, N, E)
        q = q.transpose(0, 1) if kw.get("batch_first") else q
        return q, q, q
    q, k = torch.randn(L, N, E), torch.randn(S, N, kd)
    v = k if kind == "key_is_value" and kd == vd else torch.randn(S, N, vd)
    if kw.get("batch_first"):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), (k.transpose(0, 1) if v is k else v.transpose(0, 1))
    return q, k, v


def _call_kwargs(call, batched, L=4, S=4, N=3):
    out = dict(call)
    if out.get("key_padding_mask") == "kpm":
        kpm = torch.zeros((N, S) if batched else (S,), dtype=torch.bool)
        kpm[..., -1] = True
        out["key_padding_mask"] = kpm
    mask = out.get("attn_mask")
    if mask == "float":
        out["attn_mask"] = torch.randn(L, S)
    elif mask in ("bool", "causal"):
        out["attn_mask"] = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    return out


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_explicit_mha_matches_nn_multihead_attention(case, call, kind):
    torch.manual_seed(0)
    kw = MHA_CASES[case]
    mha = nn.MultiheadAttention(E, H, **kw)
    exp = ExplicitMultiheadAttention(mha)
    q, k, v = _inputs(kw, kind)
    args = _call_kwargs(CALLS[call], q.dim() == 3)
    ref_out, ref_w = mha(q, k, v, **args)
    out, w = exp(q, k, v, **args)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    assert (w is None) == (ref_w is None)
    if w is not None:
        torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-6)


def _attn_model(kw=None, cross=False):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, E)
            self.att = nn.MultiheadAttention(E, H, batch_first=True, **(kw or {}))
            self.head = nn.Linear(E, 3)
            self.kdim = (kw or {}).get("kdim")
            if self.kdim:
                self.kin, self.vin = nn.Linear(5, self.kdim), nn.Linear(5, (kw or {})["vdim"])

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            xs = x.flip(1) if cross else x
            if self.kdim:
                k, v = torch.tanh(self.kin(xs)), torch.tanh(self.vin(xs))
            else:
                k = v = h.flip(1) if cross else h
            a, _ = self.att(h, k, v, need_weights=False)
            return self.head(torch.tanh(a).mean(1))

    return Net().double()


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("case", ["default", "kdim_vdim", "bias_kv"])
def test_converted_attention_projections_fa_with_weights_matches_autograd(case, cross):
    """FA oracle through the replacement: packed and separate projections, self- and cross-attention."""
    torch.manual_seed(0)
    model = _attn_model(MHA_CASES[case], cross)
    x, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    F.cross_entropy(model(x), y).backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    conv = bio_ext.convert(model, "fa")
    names = [n for n, _ in bio_ext.feedback_layers(conv)]
    assert "att.out_proj" in names and ("att.in_proj" in names or "att.q_proj" in names)
    set_feedback_to_weights(conv)
    F.cross_entropy(conv(x), y).backward()
    got = grads(conv)
    # same parameter objects: the converted model's names map back to the original ones
    rename = {"att.in_proj.weight": "att.in_proj_weight", "att.in_proj.bias": "att.in_proj_bias",
              "att.q_proj.weight": "att.q_proj_weight", "att.k_proj.weight": "att.k_proj_weight",
              "att.v_proj.weight": "att.v_proj_weight", "att.qkv_bias": "att.in_proj_bias"}
    assert {rename.get(k, k) for k in got} == set(ref)
    for k, g in got.items():
        torch.testing.assert_close(g, ref[rename.get(k, k)], rtol=1e-10, atol=1e-12)


def test_revert_restores_multihead_attention_with_the_same_parameters():
    model = _attn_model()
    params = {n: p for n, p in model.named_parameters()}
    conv = bio_ext.convert(model, "dfa", inplace=True)
    assert isinstance(conv.att, ExplicitMultiheadAttention)
    back = bio_ext.revert(conv, inplace=True)
    assert type(back.att) is nn.MultiheadAttention
    assert all(p is params[n] for n, p in back.named_parameters())
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(back(x), _attn_model_like(back)(x))


def _attn_model_like(model):
    fresh = _attn_model()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_converted_attention_state_dict_round_trips():
    torch.manual_seed(0)
    a = bio_ext.convert(_attn_model(), "dfa", seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    torch.manual_seed(1)
    b = bio_ext.convert(_attn_model(), "dfa", seed=2)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    x, y = torch.randn(3, 6, 5, dtype=torch.float64), torch.tensor([0, 1, 2])
    for m in (a, b):
        F.cross_entropy(m(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def _encoder(dropout=0.0):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=dropout, batch_first=True)
    return nn.Sequential(nn.Linear(5, E), nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(6 * E, 3))


@pytest.mark.parametrize("mode", ["bp", "fa", "dfa", "grape"])
def test_transformer_encoder_converts_gives_identical_outputs_and_trains(mode):
    torch.manual_seed(0)
    model = _encoder()
    x, y = torch.randn(8, 6, 5), torch.randint(0, 3, (8,))
    conv = bio_ext.convert(model, mode)
    names = [n for n, _ in bio_ext.feedback_layers(conv)]
    assert "1.layers.0.self_attn.in_proj" in names and "1.layers.1.self_attn.out_proj" in names
    for train in (True, False):  # eval + no_grad takes torch's fused fast path, which reads in_proj_weight
        model.train(train), conv.train(train)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-6)
    conv.train()
    opt = torch.optim.Adam(conv.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(conv(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert losses[-1] < losses[0], losses


torchvision = pytest.importorskip("torchvision")


def test_torchvision_vit_b_16_converts_every_projection_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10).eval()
    n_linear = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())
    n_mha = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    conv = bio_ext.convert(model, "dfa").eval()
    # out_proj was a Linear already; each MHA adds one in_proj
    assert len(bio_ext.feedback_layers(conv)) == n_linear + n_mha
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,granularity", [("bp", "layer"), ("fa", "layer"), ("dfa", "layer"), ("grape", "layer"),
                                              ("dfa", "macro"), ("dfa", "micro"), ("grape", "macro"),
                                              ("grape", "micro")])
def test_small_torchvision_vit_trains_in_every_mode_and_granularity(mode, granularity):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3)
    conv = bio_ext.convert(model, mode, granularity=granularity)
    if granularity == "micro":
        assert conv._bio_ext.points == ["encoder.layers.encoder_layer_0.self_attention",
                                        "encoder.layers.encoder_layer_0.mlp", "encoder.layers.encoder_layer_0",
                                        "encoder.layers.encoder_layer_1.self_attention",
                                        "encoder.layers.encoder_layer_1.mlp", "encoder.layers.encoder_layer_1"]
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam(conv.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(conv(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in conv.parameters())
    assert losses[-1] < losses[0], losses
    back = bio_ext.revert(conv)
    assert sum(isinstance(m, nn.MultiheadAttention) for m in back.modules()) == 2


@pytest.mark.parametrize("case", ["default", "kdim_vdim", "bias_kv"])
def test_converted_attention_keeps_multihead_attention_state_dict_keys(case):
    """A checkpoint of the original model loads into the converted one (only feedback buffers are new)."""
    torch.manual_seed(0)
    model = _attn_model(MHA_CASES[case]).double()
    conv = bio_ext.convert(model, "dfa")
    plain_keys, conv_keys = set(model.state_dict()), set(conv.state_dict())
    assert plain_keys <= conv_keys
    assert all(k.endswith("feedback") for k in conv_keys - plain_keys), conv_keys - plain_keys
    torch.manual_seed(1)
    fresh = bio_ext.convert(_attn_model(MHA_CASES[case]).double(), "dfa")
    result = fresh.load_state_dict(model.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith("feedback") for k in result.missing_keys)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), model(x))
