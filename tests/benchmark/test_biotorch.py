"""bio_ext.benchmark.biotorch: biotorch's spellings rewritten, its mode options split from the
mode's and checked, its initialisation and its step rules (gradient clip, constrained weights)."""

import torch
import torch.nn as nn

from bio_ext.benchmark import biotorch
from bio_ext.convert import convert


def test_sugar_rewrites_biotorch_spellings_in_place():
    doc = {"evaluation": False, "model": {"architecture": "le_net_mnist"}, "data": {"dataset": "cifar10_benchmark"}}
    biotorch.apply_sugar(doc)
    assert doc == {"evaluation": {"enabled": False},
                   "model": {"architecture": "le_net_mnist", "kwargs": {"variant": "mnist"}},
                   "data": {"dataset": "cifar10_benchmark", "augment": True, "val_fraction": 0.1}}


def test_keys_are_renamed_and_both_spellings_are_a_problem():
    values, problems = {"num_epochs": 3}, []
    biotorch.rename_keys("training.hyperparameters", values, problems)
    assert values == {"epochs": 3} and problems == []
    biotorch.rename_keys("training.hyperparameters", {"num_epochs": 3, "epochs": 4}, problems)
    assert problems == ["training.hyperparameters.num_epochs: give either 'num_epochs' or 'epochs', not both"]


def test_options_split_into_biotorchs_and_the_modes_own():
    bt, own = biotorch.split_options({"init": "xavier", "gradient_clip": True, "feedback_lr": 0.1})
    assert bt == {"init": "xavier", "gradient_clip": True} and own == {"feedback_lr": 0.1}
    assert biotorch.option_problems({"scaling_factor": True, "constrain_weights": 1}, "o") == [
        "o.constrain_weights: must be true or false, got 1",
        "o.scaling_factor: must be false (no biotorch layer implements it)"]
    kwargs = {}
    biotorch.convert_defaults(bt, kwargs)
    assert kwargs == {"init": "xavier"}


def test_xavier_initialisation_zeroes_the_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    biotorch.initialise(model, {"init": "xavier"})
    assert all(torch.count_nonzero(m.bias) == 0 for m in model if isinstance(m, nn.Linear))


def test_step_rules_clip_gradients_and_keep_the_converted_weights_norms():
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), "fa")
    rules = biotorch.StepRules(model, {"gradient_clip": True, "constrain_weights": True})
    assert sorted(rules.init_norms) == ["0.weight", "2.weight"]
    norms = {n: p.detach().norm().clone() for n, p in model.named_parameters() if n in rules.init_norms}
    model(torch.randn(8, 4)).pow(2).sum().mul(100).backward()
    rules.after_backward(model)
    assert all(p.grad.abs().max() <= 1 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    rules.after_step(model)
    for n, p in model.named_parameters():
        if n in norms:
            assert torch.allclose(p.norm(), norms[n])
    off = biotorch.StepRules(model, {})
    assert not off.clip and off.init_norms == {}
