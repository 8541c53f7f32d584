"""bio_ext.points: block discovery and the points' hooks (no attribute is written into the host)."""

import copy

import pytest
import torch
import torch.nn as nn

import bio_ext
from bio_ext.points import find_blocks, point_of


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn, self.mlp = nn.Linear(d, d), nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Stack(nn.Module):
    def __init__(self, n=3, d=8, classes=5):
        super().__init__()
        self.embed, self.blocks, self.head = nn.Linear(4, d), nn.ModuleList(Block(d) for _ in range(n)), nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_find_blocks_finds_the_repeated_stack_and_the_minimum_is_respected():
    assert find_blocks(Stack()) == ["blocks.0", "blocks.1", "blocks.2"]
    assert find_blocks(Stack(n=1)) == [] and find_blocks(Stack(n=1), min_blocks=1) == ["blocks.0"]


def test_points_live_in_hooks_survive_deepcopy_and_revert_removes_them():
    conv = bio_ext.convert(Stack(), "dfa", granularity="macro")
    hosts = [n for n, _ in bio_ext.feedback_points(conv)]
    assert hosts == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(not any(k.startswith("_bio_ext") or k == "bio_ext_point" for k in m.__dict__)
               for m in conv.modules() if m is not conv)
    twin = copy.deepcopy(conv)
    assert [p.host for _, p in bio_ext.feedback_points(twin)] == [twin.get_submodule(h) for h in hosts]
    loss = nn.functional.cross_entropy(twin(torch.randn(6, 4)), torch.randint(0, 5, (6,)))
    loss.backward()
    assert all(p.grad is not None for p in twin.parameters())
    plain = bio_ext.revert(conv)
    assert bio_ext.feedback_points(plain) == [] and point_of(plain.blocks[0]) is None
    assert not any(k.startswith("bio_ext_") for k in plain.state_dict())


class Doubling(nn.Module):
    """Its last layer is 8 wide but it returns 16 columns."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        y = self.proj(x)
        return torch.cat([y, y], -1)


def test_a_point_whose_output_is_not_its_layers_width_is_a_typed_error():
    model = nn.Sequential(nn.Linear(4, 8), Doubling(), nn.Linear(16, 5))
    conv = bio_ext.convert(model, "dfa", granularity="macro", points=["1"])
    with pytest.raises(bio_ext.FeedbackSignalError, match="width 8"):
        conv(torch.randn(2, 4))
