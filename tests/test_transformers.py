"""transformers models built from tiny configs: GPT-2 (Conv1D), BERT, ViT and Llama, eager and sdpa attention.

Table-driven: every architecture x attention implementation converts with identical outputs, converts
exactly the projections of its attention and MLP sub-layers, trains in every mode and granularity,
and reverts. The gradient oracle re-derives every parameter gradient with plain autograd: the
converted model's gradients must equal those of the plain model in which the tensor where the mode
injects feedback (a converted layer's input, or a macro/micro point's output) is cut from the graph and
receives ``e @ B`` instead, with ``e`` the true error at the input of the LM head (language models) or
at the classifier's output.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext import errors
from helpers import assert_point_estimates_sum_to_true, train_steps

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers.pytorch_utils import Conv1D  # noqa: E402

V, T, N = 64, 8, 3


def _gpt2(impl):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation=impl))


def _bert(impl):
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        attn_implementation=impl))


def _vit(impl):
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        attn_implementation=impl))


def _llama(impl):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        attn_implementation=impl))


def _lm_batch():
    ids = torch.randint(0, V, (N, T))
    return {"input_ids": ids, "labels": ids}


def _cls_batch():
    return {"input_ids": torch.randint(0, V, (N, T)), "labels": torch.tensor([0, 1, 2])}


def _img_batch():
    return {"pixel_values": torch.randn(N, 3, 16, 16), "labels": torch.tensor([0, 1, 2])}


# name: (factory, batch, blocks, projections of one block (attention + MLP), head, language model)
ARCHS = {
    "gpt2": (_gpt2, _lm_batch, "transformer.h", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
             "lm_head", True),
    "bert": (_bert, _cls_batch, "bert.encoder.layer",
             {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"}, "classifier", False),
    "vit": (_vit, _img_batch, "vit.layers",
            {"attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"},
            "classifier", False),
    "llama": (_llama, _lm_batch, "model.layers",
              {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}, "lm_head", True),
}
IMPLS = ["eager", "sdpa"]
MODE_GRANULARITY = [("bp", "layer"), ("fa", "layer"), ("dfa", "layer"), ("grape", "layer"), ("dfa", "macro"),
                    ("dfa", "micro"), ("grape", "macro"), ("grape", "micro"), ("drtp", "layer"), ("drtp", "micro")]


def _build(arch, impl, dtype=torch.float32):
    torch.manual_seed(0)
    model = ARCHS[arch][0](impl).to(dtype)
    assert model.config._attn_implementation == impl
    torch.manual_seed(1)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ARCHS[arch][1]().items()}
    return model, batch


def _projection_names(model, arch):
    """Every Linear/Conv1D of the attention and MLP sub-layers of every block, from the table."""
    blocks, per_block = ARCHS[arch][2], ARCHS[arch][3]
    return {f"{blocks}.{i}.{p}" for i in range(len(model.get_submodule(blocks))) for p in per_block}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_model_gives_identical_outputs_and_converts_every_projection(arch, impl):
    model, batch = _build(arch, impl)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    head, is_lm = ARCHS[arch][4], ARCHS[arch][5]
    projections = _projection_names(model, arch)
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))}
    assert projections <= linears  # the table names real layers
    for mode, granularity in MODE_GRANULARITY:
        conv = bio_ext.convert(model, mode, granularity=granularity).eval()
        names = {n for n, _ in bio_ext.feedback_layers(conv)}
        if granularity != "layer":
            assert names == set()  # ordinary backprop inside blocks; feedback at points only
            n_blocks = len(model.get_submodule(ARCHS[arch][2]))
            assert len(bio_ext.feedback_points(conv)) == n_blocks * (1 if granularity == "macro" else 3)
        elif mode in ("dfa", "grape") and is_lm:  # error_at='auto' -> head input: the head trains on the true error
            # (drtp projects a class target recovered from the logits' error, so it keeps the error at the output)
            assert names == linears - {head} and projections <= names
            assert conv._bio_ext.output_dim == model.config.hidden_size
        else:
            assert names == linears
        for grad_enabled in (False, True):  # the converted forward differs when autograd records it
            with torch.set_grad_enabled(grad_enabled):
                out = conv(**batch).logits
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=f"{mode}/{granularity}")


def _train(conv, batch, steps=8, lr=3e-3):
    return train_steps(conv, None, None, steps, lr, optimizer=torch.optim.Adam,
                       compute_loss=lambda m: m(**batch).loss)


@pytest.mark.parametrize("mode,granularity", MODE_GRANULARITY)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_model_trains_on_a_fixed_batch_and_reverts(arch, impl, mode, granularity):
    model, batch = _build(arch, impl)
    types = {n: type(m) for n, m in model.named_modules()}
    conv = bio_ext.convert(model, mode, granularity=granularity, seed=0)
    losses = _train(conv, batch)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    trained = {k: v.clone() for k, v in conv.state_dict().items()}
    conv.eval()
    with torch.no_grad():
        out = conv(**batch).logits
    back = bio_ext.revert(conv)
    assert {n: type(m) for n, m in back.named_modules()} == types
    assert back.state_dict().keys() == model.state_dict().keys()  # feedback buffers are gone
    assert all(torch.equal(v, trained[k]) for k, v in back.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, out, rtol=0, atol=0)


# ----------------------------------------------------------------------------- gradient oracle


def _first_tensor(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_first(out, t):
    return t if isinstance(out, torch.Tensor) else (t, *out[1:])


def _fit(p, like):
    """The projection (one row per error row) on a tensor shaped like ``like``: exact when the rows match,
    else spread evenly over the positions of each example (the adjoint of mean pooling)."""
    if p.numel() == like.numel():
        return p.reshape(like.shape)
    return (p[:, None, :] / like.shape[1]).expand(like.shape)


def _oracle_grads(ref, conv, batch, arch):
    """Parameter gradients of the plain ``ref`` model with feedback injected by hand at the tensors where
    ``conv`` (after its step) injects it, using ``conv``'s feedback matrices."""
    state = conv._bio_ext
    head = ARCHS[arch][4]
    sites = [(n, m.feedback, "input") for n, m in bio_ext.feedback_layers(conv)]
    sites += [(n, p.feedback, "output") for n, p in bio_ext.feedback_points(conv)]
    raw, handles = {}, []

    def cut(name, where):
        def pre(mod, args):
            raw[name] = args[0]
            return (args[0].detach().requires_grad_(True), *args[1:])

        def post(mod, args, out):
            raw[name] = _first_tensor(out)
            return _replace_first(out, raw[name].detach().requires_grad_(True))
        return pre if where == "input" else post

    head_in = {}
    handles.append(ref.get_submodule(head).register_forward_pre_hook(lambda m, a: head_in.update(x=a[0])))
    handles.append(ref.get_submodule(head).register_forward_hook(lambda m, a, o: head_in.update(y=o)))
    for name, _, where in sites:
        mod = ref.get_submodule(name)
        handles.append(mod.register_forward_pre_hook(cut(name, "input")) if where == "input"
                       else mod.register_forward_hook(cut(name, "output")))
    loss = ref(**batch).loss
    for h in handles:
        h.remove()
    at = head_in["x"] if state.output_dim != head_in["y"].shape[-1] else head_in["y"]
    (e,) = torch.autograd.grad(loss, at, retain_graph=True)
    e = e.reshape(-1, e.shape[-1])
    total = loss
    for name, fb, _ in sites:
        if raw[name].requires_grad:
            total = total + (raw[name] * _fit(e @ fb.reshape(fb.shape[0], -1), raw[name])).sum()
    ref.zero_grad(set_to_none=True)
    total.backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,granularity", [mg for mg in MODE_GRANULARITY if mg[0] in ("dfa", "grape")])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_parameter_gradient_equals_backprop_of_the_injected_feedback(arch, mode, granularity):
    model, batch = _build(arch, "eager", torch.float64)
    ref = copy.deepcopy(model)
    conv = bio_ext.convert(model, mode, granularity=granularity, seed=0)
    conv(**batch).loss.backward()
    got = {n: p.grad for n, p in conv.named_parameters() if p.grad is not None}
    want = _oracle_grads(ref, conv, batch, arch)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
    # the oracle is not trivially satisfied: backprop's gradients differ inside the model
    ref.zero_grad(set_to_none=True)
    ref(**batch).loss.backward()
    blocks = ARCHS[arch][2]
    assert any(not torch.allclose(p.grad, got[n]) for n, p in ref.named_parameters() if n.startswith(blocks))


def test_gpt2_error_at_output_feeds_back_the_vocabulary_error():
    model, batch = _build("gpt2", "eager")
    auto = bio_ext.convert(model, "dfa")
    out = bio_ext.convert(model, "dfa", error_at="output")
    assert auto._bio_ext.output_dim == 32 and out._bio_ext.output_dim == V
    assert auto.transformer.h[0].attn.c_proj.feedback.shape == (32, 32)
    assert out.transformer.h[0].attn.c_proj.feedback.shape == (V, 32)
    assert "lm_head" in {n for n, _ in bio_ext.feedback_layers(out)}
    for conv in (auto, out):
        conv(**batch).loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_error_at_head_input_needs_a_linear_output_layer():
    model, _ = _build("gpt2", "eager")
    with pytest.raises(errors.ConversionError, match="error_at='output'"):
        bio_ext.convert(model, "dfa", error_at="head_input", output_layer="transformer.ln_f")
    with pytest.raises(errors.OutputDimError, match="leave output_dim unset"):
        bio_ext.convert(model, "dfa", error_at="head_input", output_dim=V)


# ----------------------------------------------------------------------------- GrAPE at feedback points


def _tiny_gpt2_and_true_block_gradients():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager")).double()
    ids = torch.randint(0, 16, (1, 4))
    ref = copy.deepcopy(model)
    outs = {}
    hooks = [ref.transformer.h[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, _first_tensor(o)))
             for i in range(2)]
    loss = ref(input_ids=ids, labels=ids).loss
    true = torch.autograd.grad(loss, [outs[0], outs[1]])
    for h in hooks:
        h.remove()
    conv = bio_ext.convert(model, "grape", granularity="macro", options={"feedback_lr": 0.0, "keep_estimate": True})
    return conv, ids, true


def test_grape_forward_gradient_at_block_outputs_sums_to_the_true_gradient_over_a_basis(monkeypatch):
    """The estimate at point k is <e, t> u_k (t: the tangent at the tap). With u_k running over the standard
    basis and every other point's u zero, the estimates sum to J_k^T e, the true gradient at point k, exactly:
    so with u ~ N(0, I) (E[u u^T] = I) the estimate is unbiased."""
    conv, ids, true = _tiny_gpt2_and_true_block_gradients()
    assert_point_estimates_sum_to_true(monkeypatch, conv, ids, true)


@pytest.mark.slow
def test_grape_forward_gradient_at_block_outputs_is_unbiased():
    conv, ids, true = _tiny_gpt2_and_true_block_gradients()
    points = [p for _, p in bio_ext.feedback_points(conv)]
    sums = [torch.zeros_like(t) for t in true]
    draws = 1500
    for _ in range(draws):
        conv(input_ids=ids, labels=ids).loss.backward()
        for s, p in zip(sums, points):
            s += p.forward_gradient.reshape(s.shape)
    for s, t in zip(sums, true):
        assert F.cosine_similarity((s / draws).reshape(-1), t.reshape(-1), dim=0) > 0.9
    single = points[0].forward_gradient.reshape(true[0].shape)
    assert F.cosine_similarity(single.reshape(-1), true[0].reshape(-1), dim=0) < 0.7


# ----------------------------------------------------------------------------- Trainer


@pytest.mark.parametrize("mode,granularity", [("dfa", "layer"), ("grape", "macro")])
def test_transformers_trainer_trains_a_converted_model_unchanged(tmp_path, monkeypatch, mode, granularity):
    pytest.importorskip("accelerate")  # transformers.Trainer needs it
    from bio_ext.session import FeedbackSession
    model, _ = _build("gpt2", "sdpa")
    conv = bio_ext.convert(model, mode, granularity=granularity, seed=0)
    errors_seen = []
    receive = FeedbackSession.receive_error
    monkeypatch.setattr(FeedbackSession, "receive_error",
                        lambda self, e: (errors_seen.append(tuple(e.shape)), receive(self, e))[1])
    torch.manual_seed(2)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, V, (12, T))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                                          save_strategy="no", disable_tqdm=True, seed=0)
    before = {n: p.detach().clone() for n, p in conv.named_parameters()}
    result = transformers.Trainer(model=conv, args=args, train_dataset=data).train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert all(not torch.equal(p, before[n]) for n, p in conv.named_parameters())
    # the feedback path ran at every step, with the error at the LM head's input (one row per token)
    assert errors_seen == [(4 * T, 32)] * 3
    if mode == "grape":
        assert all(int(p.feedback_steps) == 3 for _, p in bio_ext.feedback_points(conv))
