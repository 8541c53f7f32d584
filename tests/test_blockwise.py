"""bio_ext.blockwise: partitioning, local-loss gradients against autograd oracles, memory mode, revert."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import bio_ext
from bio_ext.blockwise import (BlockwiseConfig, aux_prefix, balanced_cuts, partition, partition_of, recover_targets,
                               set_targets, train_step)
from bio_ext.errors import ConfigError, ConversionError, FeedbackSignalError, PartitionError
from helpers import tanh_mlp


# --------------------------------------------------------------------------- models


def mlp(sizes=(6, 9, 8, 7, 5), dtype=torch.float64):
    return tanh_mlp(sizes, dtype)


def tiny_gpt2(tie=True, layers=4):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=layers, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(cfg)


def resnet18():
    return torchvision.models.resnet18(num_classes=10)


# --------------------------------------------------------------------------- the oracle


def oracle_grads(original, wrapped, x, y, loss_fn, isolate, local_targets=None, run=None):
    """Gradients by the definition, with plain autograd on an un-hooked copy of the original model.

    Block outputs are read by plain pre-hooks (no detaching); local losses are F.cross_entropy of the
    wrapped model's auxiliary heads (copied). Isolated: block k's parameters get d L_k / d theta_k (in the
    undetached graph theta_k reaches L_k only through block k), the output layer d L_global, aux head k
    d L_k. Not isolated: every parameter gets d (L_global + sum_k L_k).
    """
    part = partition_of(wrapped)
    model = copy.deepcopy(original)
    prefix = aux_prefix(wrapped)
    aux = copy.deepcopy(wrapped.get_submodule(prefix))
    K = len(part.blocks)
    entries = [part.block_entry(k) for k in range(1, K)] + [part.head]
    feats = [None] * K

    def grab(k):
        def hook(module, args, kwargs):
            feats[k] = args[0] if args else kwargs["hidden_states"]
        return hook

    hs = [model.get_submodule(e).register_forward_pre_hook(grab(k), with_kwargs=True) for k, e in enumerate(entries)]
    out = run(model) if run is not None else model(x)
    for h in hs:
        h.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    L_global = loss_fn(out, y)
    t = local_targets if local_targets is not None else y
    C = logits.shape[-1]
    L = [F.cross_entropy(aux[k](feats[k]).reshape(-1, C), t.reshape(-1), ignore_index=-100) for k in range(K)]
    params = dict(model.named_parameters())
    aux_params = {f"{prefix}.{n}": p for n, p in aux.named_parameters()}
    expected = {}

    def grad(loss, names, table):
        gs = torch.autograd.grad(loss, [table[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, gs):
            expected[n] = torch.zeros_like(table[n]) if g is None else g

    if isolate:
        for k in range(K):
            grad(L[k], part.block_params(k), params)
            grad(L[k], [n for n in aux_params if n.startswith(f"{prefix}.{k}.")], aux_params)
        grad(L_global, part.head_params, params)
    else:
        total = L_global + sum(L)
        grad(total, [n for n in params if params[n].requires_grad], params)
        grad(total, list(aux_params), aux_params)
    return expected


def actual_grads(wrapped, x, y, loss_fn, targets=None, run=None):
    wrapped.zero_grad(set_to_none=True)
    if targets is not None:
        set_targets(wrapped, targets)
    out = run(wrapped) if run is not None else wrapped(x)
    loss_fn(out, y).backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in wrapped.named_parameters()}


def assert_grads_equal(actual, expected, atol, rtol=1e-4):
    assert set(expected) == set(actual), set(expected) ^ set(actual)
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], atol=atol, rtol=rtol, msg=lambda m: f"{n}: {m}")


ce = nn.CrossEntropyLoss()


# --------------------------------------------------------------------------- gradients: oracles


@pytest.mark.parametrize("isolate", [True, False])
@pytest.mark.parametrize("blocks", [2, 3])
def test_mlp_gradients_equal_autograd_of_local_losses(isolate, blocks):
    model = mlp()
    x, y = torch.randn(11, 6, dtype=torch.float64), torch.randint(0, 5, (11,))
    w = bio_ext.blockwise(model, blocks, isolate=isolate)
    assert len(partition_of(w).blocks) == blocks
    assert_grads_equal(actual_grads(w, x, y, ce), oracle_grads(model, w, x, y, ce, isolate), atol=1e-10)


@pytest.mark.parametrize("isolate", [True, False])
def test_resnet18_gradients_equal_autograd_of_local_losses(isolate):
    model = resnet18().double()  # float64: BatchNorm over a 1x1 map of 3 images amplifies float32 rounding
    x, y = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (3,))
    w = bio_ext.blockwise(model, 4, isolate=isolate)
    assert_grads_equal(actual_grads(w, x, y, ce), oracle_grads(model, w, x, y, ce, isolate), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("isolate", [True, False])
def test_gpt2_labels_loss_gives_per_token_local_gradients(isolate):
    """The loss computed inside transformers (labels=, shifted) still reaches the heads; targets are shifted."""
    model = tiny_gpt2(tie=False)
    ids = torch.randint(0, 37, (3, 7))
    w = bio_ext.blockwise(model, 2, isolate=isolate)
    shifted = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)

    def run(m):
        return m(input_ids=ids, labels=ids)

    def loss_fn(out, _):
        return out.loss

    expected = oracle_grads(model, w, ids, ids, loss_fn, isolate, local_targets=shifted, run=run)
    assert_grads_equal(actual_grads(w, ids, ids, loss_fn, run=run), expected, atol=1e-6, rtol=1e-3)


def test_explicit_targets_serve_a_non_cross_entropy_global_loss():
    model = mlp()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 5, (9,))

    def mse(out, y):
        return F.mse_loss(out, F.one_hot(y, 5).to(out.dtype))

    w = bio_ext.blockwise(model, 3)
    expected = oracle_grads(model, w, x, y, mse, isolate=True)
    assert_grads_equal(actual_grads(w, x, y, mse, targets=y), expected, atol=1e-10)


@pytest.mark.parametrize("model_fn,shape", [(mlp, (7, 6)), (resnet18, (3, 3, 16, 16))])
def test_early_backward_gives_the_isolated_gradients(model_fn, shape):
    model = model_fn()
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(*shape, dtype=dtype), torch.randint(0, 5, (shape[0],))
    iso = bio_ext.blockwise(model, 3, seed=1)
    early = bio_ext.blockwise(model, 3, seed=1, early_backward=True)
    g_iso = actual_grads(iso, x, y, ce)
    g_early = actual_grads(early, x, y, ce, targets=y)
    assert_grads_equal(g_early, g_iso, atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert bio_ext.local_losses(early) == pytest.approx(bio_ext.local_losses(iso), rel=1e-5)


def test_fa_inside_blocks_matches_fa_autograd_and_differs_from_bp():
    model = mlp(sizes=(6, 9, 8, 7, 6, 5))
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    w = bio_ext.blockwise(model, 2, layer_mode="fa", seed=3)
    head = partition_of(w).head
    fa_model = bio_ext.convert(model, "fa", exclude=[head], seed=3)
    for (n1, m1), (n2, m2) in zip(bio_ext.feedback_layers(w), bio_ext.feedback_layers(fa_model)):
        assert n1 == n2 and torch.equal(m1.feedback, m2.feedback)
    expected = oracle_grads(fa_model, w, x, y, ce, isolate=True)
    got = actual_grads(w, x, y, ce)
    assert_grads_equal(got, expected, atol=1e-10)
    bp = actual_grads(bio_ext.blockwise(model, 2, seed=3), x, y, ce)
    first = partition_of(w).block_params(0)[0]  # block 1's first weight: two layers below its head, FA differs
    assert not torch.allclose(got[first], bp[first])


@pytest.mark.parametrize("mode", ["dfa", "drtp"])
def test_direct_modes_inside_blocks_project_each_blocks_own_local_error(mode):
    """Hand oracle, MLP x -L0- h1 | -L1- h2 -L2- h3 | -L3-> out, split after h1, layer_mode dfa/drtp:
    block 2's L2 gets s_2 @ B_L2 at its input (s = the local error e_2 for dfa, -onehot(y)/N for drtp),
    L2 itself the true gradient through its auxiliary head A1; block 1 (one layer) trains on A0's error."""
    import torch.nn.functional as F
    from helpers import dfa_signal, drtp_signal
    signal = {"dfa": dfa_signal, "drtp": drtp_signal}[mode]
    model = mlp(sizes=(6, 9, 8, 7, 5))
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    w = bio_ext.blockwise(model, splits=["2"], layer_mode=mode, seed=3)
    ce(w(x), y).backward()
    l0, l1, l2, l3 = w[0], w[2], w[4], w[6]
    a0, a1 = w.get_submodule(aux_prefix(w))[0], w.get_submodule(aux_prefix(w))[1]
    with torch.no_grad():
        h1 = torch.tanh(x @ l0.weight.t() + l0.bias)
        h2 = torch.tanh(h1 @ l1.weight.t() + l1.bias)
        h3 = torch.tanh(h2 @ l2.weight.t() + l2.bias)
        onehot = F.one_hot(y, 5).to(x.dtype)
        e1 = (torch.softmax(a0(h1), 1) - onehot) / len(y)
        e2 = (torch.softmax(a1(h3), 1) - onehot) / len(y)
        aux_w0 = [m for m in a0.modules() if isinstance(m, nn.Linear)][-1].weight
        aux_w1 = [m for m in a1.modules() if isinstance(m, nn.Linear)][-1].weight
        d0 = (e1 @ aux_w0) * (1 - h1 ** 2)
        d2 = (e2 @ aux_w1) * (1 - h3 ** 2)
        d1 = (signal(e2, y) @ l2.feedback) * (1 - h2 ** 2)
    torch.testing.assert_close(l0.weight.grad, d0.t() @ x)
    torch.testing.assert_close(l2.weight.grad, d2.t() @ h2)
    torch.testing.assert_close(l2.bias.grad, d2.sum(0))
    torch.testing.assert_close(l1.weight.grad, d1.t() @ h1)
    torch.testing.assert_close(l1.bias.grad, d1.sum(0))
    assert l2.feedback.shape == (5, 8)
    # the model's output layer trains on the global loss only
    e = (torch.softmax(l3(h3), 1) - onehot) / len(y)
    torch.testing.assert_close(l3.weight.grad, e.t() @ h3)
    # and it is not backprop inside the block
    bp = bio_ext.blockwise(model, splits=["2"], seed=3)
    ce(bp(x), y).backward()
    assert not torch.allclose(bp[2].weight.grad, l1.weight.grad)


def test_direct_modes_inside_blocks_with_early_backward_match_one_backward():
    model = mlp(sizes=(6, 9, 8, 7, 5))
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 5, (10,))
    late = bio_ext.blockwise(model, splits=["2"], layer_mode="dfa", seed=3)
    early = bio_ext.blockwise(model, splits=["2"], layer_mode="dfa", seed=3, early_backward=True)
    assert_grads_equal(actual_grads(early, x, y, ce, targets=y), actual_grads(late, x, y, ce), atol=1e-12)


@pytest.mark.parametrize("options,match", [({"layer_mode": "grape"}, "tangents"),
                                           ({"layer_mode": "dfa", "isolate": False}, "isolate=True")])
def test_direct_layer_modes_that_cannot_work_inside_blocks_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        bio_ext.blockwise(mlp(), 2, **options)


# --------------------------------------------------------------------------- targets from the output error


def test_recover_targets_is_exact_for_cross_entropy_and_skips_ignored_rows():
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 3, -100, 2, 1, -100])
    F.cross_entropy(z, y, ignore_index=-100).backward()
    assert torch.equal(recover_targets(z.grad), y)


def test_loss_that_is_not_cross_entropy_raises_a_typed_error():
    w = bio_ext.blockwise(mlp(), 2)
    x = torch.randn(4, 6, dtype=torch.float64)
    out = w(x)
    with pytest.raises(FeedbackSignalError, match="set_targets"):
        out.exp().sum().backward()  # error rows all positive: no target to recover


def test_early_backward_without_targets_names_the_fix():
    w = bio_ext.blockwise(mlp(), 2, early_backward=True)
    with pytest.raises(FeedbackSignalError, match="set_targets"):
        w(torch.randn(3, 6, dtype=torch.float64))


def test_train_step_helper_trains_with_early_backward():
    torch.manual_seed(0)
    w = bio_ext.blockwise(mlp(), 2, early_backward=True)
    x = torch.randn(64, 6, dtype=torch.float64)
    y = (x @ torch.randn(6, 5, dtype=torch.float64)).argmax(1)  # a learnable labelling
    opt = torch.optim.Adam(w.parameters(), lr=0.02)
    losses = [train_step(w, x, y, ce, opt).item() for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0]


# --------------------------------------------------------------------------- partition


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                                    max_position_embeddings=16))


FAMILIES = {
    "resnet18": (resnet18, 9),
    "vgg11": (lambda: torchvision.models.vgg11(num_classes=10), 10),
    "alexnet": (lambda: torchvision.models.alexnet(num_classes=10), 7),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 19),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 14),
    "sequential": (mlp, 3),
    "gpt2": (tiny_gpt2, 5),
    "bert": (_tiny_bert, 4),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_partition_covers_every_parameter_once_and_respects_k(name):
    fn, n_units = FAMILIES[name]
    model = fn()
    for k in sorted({1, min(3, n_units), n_units}):
        part = partition(model, k)
        assert len(part.blocks) == k and all(part.blocks)
        assert [u for b in part.blocks for u in b] == list(range(n_units))  # contiguous, in order
        owned = [p for i in range(k) for p in part.block_params(i)] + part.head_params
        assert len(owned) == len(set(owned))
        named = dict(model.named_parameters())  # deduplicated by tensor identity (tied weights once)
        assert sorted(owned) == sorted(named) and part.unused == []
    with pytest.raises(PartitionError, match=f"use blocks <= {n_units}"):
        partition(model, n_units + 1)


def test_tied_output_weight_is_reported_shared():
    part = partition(tiny_gpt2(tie=True), 2)
    assert part.shared == ["transformer.wte.weight"] and part.head == "lm_head"


@pytest.mark.parametrize("costs,k", [([1, 1, 1, 1], 2), ([5, 1, 1, 1, 1, 1], 3), ([1, 2, 3, 4, 5, 6, 7], 3),
                                     ([3, 0, 0, 3], 2), ([2, 9, 1, 1, 8, 1], 4), ([1], 1)])
def test_balanced_cuts_minimise_the_largest_block(costs, k):
    cuts = balanced_cuts(costs, k)
    assert cuts[0] == 0 and len(cuts) == k and cuts == sorted(set(cuts))

    def worst(starts):
        b = list(starts) + [len(costs)]
        return max(sum(costs[b[i]:b[i + 1]]) for i in range(k))

    brute = min(worst((0, *c)) for c in itertools.combinations(range(1, len(costs)), k - 1))
    assert worst(cuts) == brute


def test_explicit_splits_start_blocks_at_the_named_units():
    part = partition(resnet18(), splits=["layer2.0", "layer4.0"])
    assert [part.units[b[0]].name for b in part.blocks] == ["conv1", "layer2.0", "layer4.0"]
    with pytest.raises(PartitionError, match="not units"):
        partition(resnet18(), splits=["layer9.0"])
    with pytest.raises(PartitionError, match="forward order"):
        partition(resnet18(), splits=["layer4.0", "layer2.0"])


def test_unknown_architecture_names_units_and_head():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    with pytest.raises(PartitionError, match=r"units=\["):
        bio_ext.blockwise(Net(), 2)
    w = bio_ext.blockwise(Net(), 2, units=["a", "b"], head="out")
    assert partition_of(w).block_params(1) == ["b.weight", "b.bias"]


def test_units_out_of_forward_order_are_refused():
    with pytest.raises(PartitionError, match="order"):
        partition(mlp(), 2, units=["4", "2"], head="6")


# --------------------------------------------------------------------------- wrapper behaviour


def test_wrapping_leaves_the_model_untouched_and_revert_restores_it():
    model = resnet18()
    x = torch.randn(2, 3, 32, 32)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    w = bio_ext.blockwise(model, 4)
    assert not hasattr(model, "bio_ext_aux_heads") and not model._forward_pre_hooks
    model.eval(), w.eval()
    torch.testing.assert_close(w(x), model(x))  # main path only, same output
    w.train()
    params = [p for n, p in w.named_parameters() if not n.startswith("bio_ext_aux_heads")]
    r = bio_ext.revert(w, inplace=True)
    assert not hasattr(r, "bio_ext_aux_heads") and not bio_ext.blockwise.is_blockwise(r)
    assert all(a is b for a, b in zip(params, r.parameters()))
    assert sorted(before) == sorted(r.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in r.modules())


def test_failed_inplace_wrap_leaves_the_model_untouched():
    model = mlp()
    with pytest.raises(PartitionError):
        bio_ext.blockwise(model, 9, inplace=True)
    assert not hasattr(model, "bio_ext_aux_heads")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_revert_gives_a_plain_copy_and_the_wrapped_model_keeps_its_local_losses():
    torch.manual_seed(0)
    w = bio_ext.blockwise(mlp(), 2)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 5, (8,))
    plain = bio_ext.revert(w)
    assert bio_ext.blockwise.is_blockwise(w) and not bio_ext.blockwise.is_blockwise(plain)
    assert not any("aux" in n for n, _ in plain.named_parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(plain(x), w(x))
    bio_ext.blockwise.train_step(w, x, y, nn.functional.cross_entropy)
    assert len(bio_ext.blockwise.local_losses(w)) == 2
    assert all(p.grad is not None for p in w.get_submodule(aux_prefix(w)).parameters())


@pytest.mark.parametrize("layer_mode", [None, "dfa"])
def test_alignment_of_a_wrapped_model_is_its_local_gradient_against_the_end_to_end_one(layer_mode):
    """Issue 13 item 7: bio_ext.alignment (and so the runner's probe) measures block-wise training too."""
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    w = bio_ext.blockwise(model, 2, seed=0, layer_mode=layer_mode)
    report = bio_ext.alignment(w, x, y)
    assert all(p.grad is None for p in w.parameters()) and bio_ext.blockwise.local_losses(w) == []
    twin = bio_ext.blockwise(model, 2, seed=0, layer_mode=layer_mode)  # the same heads and feedback
    bio_ext.blockwise.train_step(twin, x, y, F.cross_entropy)
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    names = [n for n, m in plain.named_modules() if isinstance(m, nn.Linear)]
    assert list(report) == names
    for n in names:
        a, b = twin.get_submodule(n).weight.grad.reshape(-1), plain.get_submodule(n).weight.grad.reshape(-1)
        expected = torch.rad2deg(torch.arccos(torch.clamp(F.cosine_similarity(a, b, dim=0), -1, 1))).item()
        assert report[n].update == pytest.approx(expected, abs=1e-6), n
    assert report[names[-1]].update < 1e-6 and all(report[n].update > 5 for n in names[:-1])


def test_wrapped_model_refuses_deepcopy_and_names_revert():
    with pytest.raises(TypeError, match="revert"):
        copy.deepcopy(bio_ext.blockwise(mlp(), 2))


def test_no_auxiliary_work_without_gradients():
    w = bio_ext.blockwise(mlp(), 2)
    with torch.no_grad():
        w(torch.randn(3, 6, dtype=torch.float64))
    assert partition_of(w) is not None and bio_ext.local_losses(w) == []


def test_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        BlockwiseConfig(blocks=0, cost="time", pool="max", isolate=False, early_backward=True)
    assert len(info.value.problems) == 4


def test_config_round_trips_and_convert_dispatches():
    cfg = BlockwiseConfig(blocks=2, isolate=False, cost="params", seed=4)
    assert BlockwiseConfig.from_yaml(cfg.to_yaml()) == cfg
    w = bio_ext.convert(mlp(), mode="bwbpf", blocks=3)
    assert len(partition_of(w).blocks) == 3
    w2 = bio_ext.convert(mlp(), cfg)
    assert len(partition_of(w2).blocks) == 2 and not bio_ext.blockwise.state_of(w2).config.isolate


def test_wrapping_twice_or_a_converted_model_is_refused():
    w = bio_ext.blockwise(mlp(), 2)
    with pytest.raises(ConversionError, match="revert"):
        bio_ext.blockwise(w, 2)
    with pytest.raises(ConversionError, match="layer_mode"):
        bio_ext.blockwise(bio_ext.convert(mlp(), "fa"), 2)


# --------------------------------------------------------------------------- a few training steps


def test_resnet18_trains_a_few_steps():
    torch.manual_seed(0)
    w = bio_ext.blockwise(resnet18(), 4)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(w.parameters(), lr=0.05, momentum=0.9)
    first_local, losses = None, []
    for _ in range(6):
        opt.zero_grad()
        loss = ce(w(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        first_local = first_local or bio_ext.local_losses(w)
    assert losses[-1] < losses[0]
    assert sum(bio_ext.local_losses(w)) < sum(first_local)


def test_tiny_gpt2_with_tied_embeddings_trains_a_few_steps():
    torch.manual_seed(0)
    w = bio_ext.blockwise(tiny_gpt2(tie=True), 3)
    ids = torch.randint(0, 37, (4, 12))
    opt = torch.optim.Adam(w.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = w(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert len(bio_ext.local_losses(w)) == 3


def test_resnet18_with_dfa_inside_blocks_trains_and_reverts_to_plain_layers():
    torch.manual_seed(0)
    w = bio_ext.blockwise(torchvision.models.resnet18(num_classes=10), blocks=2, layer_mode="dfa", seed=0)
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ce(w(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in w.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    plain = bio_ext.revert(w)
    assert not bio_ext.is_converted(plain) and not any(isinstance(m, bio_ext.FeedbackLayer) for m in plain.modules())
