"""Activation checkpointing (issue 13, item 2): ``torch.utils.checkpoint`` around converted blocks (either
``use_reentrant``) and transformers' ``activation_checkpointing_enable()`` (formerly
``gradient_checkpointing_enable()``) give the gradients of the same step
without checkpointing. The recompute runs during the backward, when no forward is running: it finds its
session (:func:`bio_ext.session.current_session`), registers no layer twice and projects nothing twice.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import bio_ext
from bio_ext import errors


def enable_transformers_checkpointing(model, **kwargs):
    """transformers' activation checkpointing, by its current name (``activation_checkpointing_enable``; the
    older ``gradient_checkpointing_enable`` is deprecated and warns): both set the modules' ``gradient_checkpointing``
    flag, which is what GrAPE reads."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Block(nn.Module):
    def __init__(self, width=16, p=0.3):
        super().__init__()
        self.l1, self.l2, self.drop = nn.Linear(width, width), nn.Linear(width, width), nn.Dropout(p)

    def forward(self, x):
        return x + self.l2(self.drop(torch.relu(self.l1(x))))


class Net(nn.Module):
    """Three residual blocks with dropout, each checkpointed when ``reentrant`` is not None."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.out = nn.Linear(16, 4)  # registered last: the output layer
        self.reentrant = None
        self.whole = False

    def body(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = checkpoint(b, h, use_reentrant=self.reentrant) if self.reentrant is not None else b(h)
        return h

    def forward(self, x):
        if self.whole:  # the output layer inside the checkpointed segment too
            return checkpoint(lambda t: self.out(self.body(t)), x, use_reentrant=self.reentrant)
        return self.out(self.body(x))


def grads_of(model, x, y, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=1e-5, msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("mode", ["dfa", "drtp", "fa"])
def test_checkpointed_blocks_give_the_gradients_of_the_plain_forward(mode, reentrant, whole):
    torch.manual_seed(0)
    model = bio_ext.convert(Net(), mode, seed=0)
    # reentrant checkpointing needs an input that requires grad for its output to require one (torch's rule)
    x, y = torch.randn(5, 8, requires_grad=reentrant and whole), torch.randint(0, 4, (5,))
    want = grads_of(copy.deepcopy(model), x, y)
    model.reentrant, model.whole = reentrant, whole
    assert_same_grads(grads_of(model, x, y), want)
    assert_same_grads(grads_of(model, x, y), want)  # and again: nothing of the last step is left behind


def test_the_recompute_registers_no_layer_twice_and_projects_only_what_is_used():
    torch.manual_seed(0)
    model = bio_ext.convert(Net(), "dfa", seed=0)
    model.reentrant = False
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    sessions = []
    model.out.register_forward_hook(lambda m, a, out: sessions.append(bio_ext.session.current_session()))
    F.cross_entropy(model(x), y).backward()
    (session,) = sessions
    forward_slots = 7  # the input layer sees data: blocks' 6 layers and the output layer
    assert len(session.proj) == forward_slots
    assert len(session.feedbacks) == forward_slots + 6  # the recomputed layers' slots...
    assert session.late == {}  # ...whose projections were never computed (the forward's nodes did the work)


def test_two_models_in_one_backward_each_find_their_own_session():
    torch.manual_seed(0)
    a, b = (bio_ext.convert(Net(), "dfa", seed=s) for s in (0, 1))
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    want_a, want_b = grads_of(copy.deepcopy(a), x, y), grads_of(copy.deepcopy(b), x, y)
    a.reentrant = b.reentrant = False
    torch.manual_seed(3)
    la = F.cross_entropy(a(x), y)
    torch.manual_seed(3)
    lb = F.cross_entropy(b(x), y)
    (la + lb).backward()
    assert_same_grads({n: p.grad for n, p in a.named_parameters()}, want_a)
    assert_same_grads({n: p.grad for n, p in b.named_parameters()}, want_b)


@pytest.mark.slow
def test_torchvision_resnet18_with_checkpointed_stages_in_dfa():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    model = bio_ext.convert(net, "dfa", seed=0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    model.train()
    want = grads_of(copy.deepcopy(model), x, y)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, name)
        stage.forward = (lambda s: lambda t: checkpoint(nn.Sequential.forward, s, t, use_reentrant=False))(stage)
    assert_same_grads(grads_of(model, x, y), want, atol=1e-5)


@pytest.mark.parametrize("granularity", ["layer", pytest.param("macro", marks=pytest.mark.slow)])
def test_transformers_gpt2_gradient_checkpointing_in_dfa(granularity):
    """transformers' default (non-reentrant) and reentrant checkpointing. With macro/micro granularity a block's
    input is the detached output of the block below, so a reentrant segment has no input that requires grad and
    torch leaves its parameters without gradients (torch warns "None of the inputs have requires_grad=True"):
    only non-reentrant checkpointing is tested there, as documented in bio_ext.session.FeedbackSession.close."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    model = bio_ext.convert(gpt, "dfa", seed=0, granularity=granularity)
    model.train()  # dropout on: the recompute must see the same masks
    ids = torch.randint(0, 64, (3, 8))

    def grads(m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    want = grads(copy.deepcopy(model))
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True})[:2 if granularity == "layer" else 1]:
        m = copy.deepcopy(model)
        enable_transformers_checkpointing(m, **kwargs)
        assert m.transformer.gradient_checkpointing
        assert_same_grads(grads(m), want, atol=1e-6)


def test_a_converted_layer_called_outside_any_forward_still_raises():
    model = bio_ext.convert(Net(), "dfa", seed=0)
    with pytest.raises(errors.FeedbackSignalError, match="outside the forward"):
        model.blocks[0].l2(torch.randn(2, 16, requires_grad=True))


# --------------------------------------------------------------------------- GrAPE: what is true (see bio_ext.modes.grape)


@pytest.mark.slow
def test_grape_under_transformers_checkpointing_trains_with_dfa_and_leaves_its_feedback():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model = bio_ext.convert(gpt, "grape", seed=0, options={"feedback_lr": 0.0})
    model.train()
    ids = torch.randint(0, 64, (3, 8))
    dfa = copy.deepcopy(model)  # GrAPE with a zero rate: DFA's gradients with GrAPE's feedback
    dfa(input_ids=ids, labels=ids).loss.backward()
    before = {n: l.feedback.clone() for n, l in bio_ext.feedback_layers(model)}
    enable_transformers_checkpointing(model, use_reentrant=False)
    for name, layer in bio_ext.feedback_layers(model):
        layer.mode_options = {**layer.mode_options, "feedback_lr": 0.05}  # would turn B without checkpointing
    with pytest.warns(UserWarning, match="no forward-mode tangents"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert_same_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                      {n: p.grad for n, p in dfa.named_parameters() if p.grad is not None})
    for name, layer in bio_ext.feedback_layers(model):
        assert torch.equal(layer.feedback, before[name]) and int(layer.feedback_steps) == 0, name


def test_grape_inside_a_non_reentrant_checkpoint_is_refused_naming_the_fixes():
    model = bio_ext.convert(Net(), "grape", seed=0)
    model.reentrant = False
    with pytest.raises(errors.FeedbackSignalError, match="activation_checkpointing_enable"):
        model(torch.randn(5, 8))


def test_grape_with_reentrant_segments_steps_only_the_layers_outside_them():
    torch.manual_seed(0)
    model = bio_ext.convert(Net(), "grape", seed=0)
    model.reentrant = True
    before = {n: l.feedback.clone() for n, l in bio_ext.feedback_layers(model)}
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    for n, g in grads_of(model, x, y).items():
        assert torch.isfinite(g).all(), n
    for name, layer in bio_ext.feedback_layers(model):
        stepped = int(layer.feedback_steps) == 1
        assert stepped == (name == "out"), name  # inside the segments: DFA's projection, no estimate
        assert stepped != torch.equal(layer.feedback, before[name]), name
