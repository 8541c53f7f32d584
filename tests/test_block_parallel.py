"""Block-parallel training (bio_ext.blockwise.parallel): two CPU processes (gloo), one block each, against
single-process block-wise training on the same micro-batches.

One spawn runs every case (starting processes costs seconds); each rank writes its block's parameters after
the steps and the test compares them, name by name, with the single-process run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.blockwise.pipeline import _StandIn

STEPS, MICRO, BATCH, LR = 3, 2, 8, 0.02


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


def _resnet():  # torchvision's ResNet class (not a Sequential: stand-ins inside its blocks), one block a stage
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4)


CASES = {"mlp": (_mlp, (12,), {}), "cnn": (_cnn, (3, 6, 6), {}), "resnet": (_resnet, (3, 16, 16), {}),
         "mlp-fa-layers": (_mlp, (12,), {"layer_mode": "fa"})}


def _model(name):
    make, shape, options = CASES[name]
    torch.manual_seed(0)
    return make().double(), shape, dict(options, seed=0)  # float64: thread counts differ between the runs


def _data(shape, step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, *shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (BATCH,), generator=g)


def _worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for name in CASES:
            model, shape, options = _model(name)
            x0, _ = _data(shape, 0)
            stage = bio_ext.blockwise.parallel(model, x0[:2], micro_batches=MICRO, **options)
            opt = torch.optim.SGD(stage.parameters(), lr=LR)
            for step in range(STEPS):
                x, y = _data(shape, step)
                stage.train_step(x, y, opt) if rank == 0 else stage.train_step(None, None, opt)
            stage.flush()
            stand_ins = sum(isinstance(m, _StandIn) for m in stage.model.modules())
            torch.save({"params": {n: p.detach().clone() for n, p in stage.named_parameters()},
                        "stand_ins": stand_ins}, f"{out}/{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(name):
    """The same steps with bio_ext.blockwise in one process: an optimizer step per micro-batch."""
    model, shape, options = _model(name)
    x0, _ = _data(shape, 0)
    wrapped = bio_ext.blockwise(model, 2, example_input=x0[:2], **options)
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = _data(shape, step)
        for xm, ym in zip(x.chunk(MICRO), y.chunk(MICRO)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(wrapped(xm), ym).backward()
            opt.step()
    return wrapped


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("block_parallel")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, str(out / "store"), str(out)), nprocs=2, start_method="spawn")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_end_with_the_weights_of_single_process_blockwise_training(ranks_output, name):
    wrapped = _single_process(name)
    state = bio_ext.blockwise.state_of(wrapped)
    params = dict(wrapped.named_parameters())
    start = dict(_model(name)[0].named_parameters())
    for rank in range(2):
        saved = torch.load(ranks_output / f"{name}-{rank}.pt")
        got = saved["params"]
        assert len(got) > 2
        # process 1 does not compute block 0: its layers there are stand-ins
        assert (saved["stand_ins"] > 0) == (rank == 1), saved["stand_ins"]
        for n, p in got.items():
            ref = state.aux[rank].get_parameter(n[len("aux."):]) if n.startswith("aux.") else params[n]
            torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7,
                                       msg=lambda m, n=n: f"rank {rank}: {n}: {m}")
        moved = [n for n in got if not n.startswith("aux.") and n in start and not torch.equal(got[n], start[n])]
        assert moved, f"rank {rank} trained nothing"  # the comparison is not between untouched weights


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least 2 processes"),
    ({"micro_batches": 0}, "micro_batches"),
    ({"layer_mode": "dfa"}, "direct mode"),
    ({"isolate": False}, "isolate=True"),
    ({"example": None}, "example_input"),
])
def test_block_parallel_refuses_what_it_cannot_run_naming_the_fix(tmp_path, kwargs, match):
    with pytest.raises(bio_ext.errors.ConfigError, match="torch.distributed initialised"):
        bio_ext.blockwise.parallel(_mlp(), torch.zeros(2, 12))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kwargs = dict(kwargs)
        example = kwargs.pop("example", torch.zeros(2, 12))
        with pytest.raises(bio_ext.errors.ConfigError, match=match):
            bio_ext.blockwise.parallel(_mlp(), example, **kwargs)
    finally:
        dist.destroy_process_group()
