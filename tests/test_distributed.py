"""DistributedDataParallel with 2 CPU ranks (gloo) in every mode: the all-reduced gradients against one process
on the whole batch, GrAPE's feedback kept identical across ranks (bio_ext.distributed), and the YAML runner
under torchrun.

One spawn of 2 ranks (tests/ddp_worker.py) trains every case; the tests compare its results with the same
training in this process (float64, so the tolerances are tight)."""

import os
import time

import pytest
import torch

import bio_ext
from bio_ext import distributed
from bio_ext.errors import ConfigError

import ddp_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TIGHT = {"rtol": 1e-12, "atol": 1e-14}


def spawn(fn, args, nprocs, timeout=180.0):
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail (and end them) after ``timeout`` seconds."""
    ctx = torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {nprocs} ranks did not finish in {timeout:.0f} s (a collective that not every rank ran?)")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runner_dirs(tmp_path_factory):
    """The runner's experiment as the ranks find it (see test_runner_in_2_ranks_...), and the reference run."""
    from bio_ext.benchmark import load_config, run_experiment
    tmp = tmp_path_factory.mktemp("runner")
    single = run_experiment(load_config(str(_runner_config(tmp / "single.yaml", tmp / "single"))))
    cfg_path = _runner_config(tmp / "ddp.yaml", tmp / "ddp", gpus="[0, 1]")  # no CUDA here: CPU, gloo

    class Killed(Exception):
        pass

    def kill(run, epoch):
        raise Killed

    with pytest.raises(Killed):
        run_experiment(load_config(str(cfg_path)), on_epoch_end=kill)
    root = tmp / "ddp" / "tiny"
    assert (root / "dfa" / "seed_0" / "checkpoint.pt").is_file() and not (root / "bwbpf").exists()
    return single, cfg_path, root


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, runner_dirs):
    """One spawn of 2 ranks: every DDP case, then the YAML runner with torchrun's environment."""
    out = tmp_path_factory.mktemp("ddp")
    argv = [str(runner_dirs[1]), "--resume", "--no-progress"]
    spawn(W.run_rank, (str(out / "store"), str(out), argv, _free_port()), W.WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W.WORLD)]


def _close(a, b, what, **tol):
    assert a.keys() == b.keys(), what
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=lambda m: f"{what} {n}: {m}", **(tol or TIGHT))


def _reference(factory, mode, opts):
    x, y = W.data(factory)
    if mode in ("grape", "fdfa"):  # fdfa perturbs with GrAPE's machinery
        with W.rank_perturbations():
            return W.train(W.build(factory, mode, opts), x, y)
    return W.train(W.build(factory, mode, opts), x, y)


@pytest.mark.parametrize("factory,mode,opts", W.GRADIENT_CASES, ids=[W.case_name(*c) for c in W.GRADIENT_CASES])
def test_all_reduced_gradient_is_the_whole_batch_gradient(ranks, factory, mode, opts):
    """Equal shards, mean-reduced loss: DDP's average of the per-rank gradients is the single-process gradient of
    the whole batch, at every step (so the parameters after the steps agree too), on both ranks."""
    name = W.case_name(factory, mode, opts)
    ref = _reference(factory, mode, opts)
    for rank, got in enumerate(ranks):
        for step, (g, r) in enumerate(zip(got[name]["grads"], ref["grads"])):
            _close(g, r, f"rank {rank} step {step} gradient")
        _close(got[name]["params"], ref["params"], f"rank {rank} parameter")
        _close(got[name]["buffers"], ref["buffers"], f"rank {rank} buffer")
    for n, p in ranks[0][name]["params"].items():  # DDP's all-reduce: the very same bits on every rank
        assert torch.equal(p, ranks[1][name]["params"][n]), n


SYNCED = [c for c in W.GRAPE_CASES if (c[2] != "plain" and c[3] == "auto") or c[3] == "world"]


@pytest.mark.parametrize("factory,opts,how,sync", SYNCED, ids=[W.case_name(c[0], "grape", *c[1:]) for c in SYNCED])
def test_grape_feedback_is_identical_across_ranks_and_equals_the_whole_batch(ranks, factory, opts, how, sync):
    """GrAPE's feedback step uses the global batch: after the steps every buffer (feedback, velocity, step count)
    is bit-identical on both ranks, with DDP's broadcast_buffers on ("ddp") and off ("ddp-local"); under DDP it
    equals one process stepping on the concatenated batch with the same perturbations, and so do the gradients."""
    name = W.case_name(factory, "grape", opts, how, sync)
    r0, r1 = ranks[0][name], ranks[1][name]
    for n, b in r0["buffers"].items():
        assert torch.equal(b, r1["buffers"][n]), f"{n} differs between the ranks"
    steps = [b for n, b in r0["buffers"].items() if n.endswith("feedback_steps")]
    assert {int(s) for s in steps} == {0, W.STEPS}  # the first layer (its input needs no gradient) never steps
    initial = W.build(factory, "grape", opts).state_dict()
    moved = [n for n, b in r0["buffers"].items() if n.endswith("feedback") and not torch.equal(b, initial[n])]
    assert moved, "no feedback turned"
    if how == "plain":  # each rank trains its own weights: only the feedback is shared
        return
    ref = _reference(factory, "grape", opts)
    _close(r0["buffers"], ref["buffers"], "buffer")
    for step, (g, r) in enumerate(zip(r0["grads"], ref["grads"])):
        _close(g, r, f"step {step} gradient")


@pytest.mark.parametrize("factory,mode,opts", W.LEARNED_CASES, ids=[W.case_name(*c) for c in W.LEARNED_CASES])
def test_learned_feedback_of_dkp_and_fdfa_is_identical_across_ranks_and_equals_the_whole_batch(ranks, factory,
                                                                                              mode, opts):
    """dkp's Kolen-Pollack step and fdfa's Jacobian estimate are averaged over the ranks (one all_reduce per
    step): with broadcast_buffers=False the feedback stays bit-identical on both ranks and equals one process on
    the concatenated batch (fdfa: with the ranks' perturbations), and so do the gradients."""
    name = W.case_name(factory, mode, opts)
    r0, r1 = ranks[0][name], ranks[1][name]
    for n, b in r0["buffers"].items():
        assert torch.equal(b, r1["buffers"][n]), f"{n} differs between the ranks"
    initial = W.build(factory, mode, opts).state_dict()
    assert any(n.endswith("feedback") and not torch.equal(b, initial[n]) for n, b in r0["buffers"].items())
    ref = _reference(factory, mode, opts)
    _close(r0["buffers"], ref["buffers"], "buffer")
    for step, (g, r) in enumerate(zip(r0["grads"], ref["grads"])):
        _close(g, r, f"step {step} gradient")


@pytest.mark.parametrize("how", ["ddp-local", "ddp", "plain"])
def test_grape_without_sync_keeps_each_ranks_own_feedback(ranks, how):
    """sync_feedback(model, None) (or a model outside DDP, with the default "auto"): nothing is communicated,
    each rank steps from its shard and the feedback differs between the ranks (with broadcast_buffers=True
    DDP puts rank 0's back at every forward, discarding rank 1's steps: the last step's still differ)."""
    sync = "auto" if how == "plain" else "off"
    name = W.case_name("mlp", "grape", {}, how, sync)
    r0, r1 = ranks[0][name], ranks[1][name]
    fbs = [n for n in r0["buffers"] if n.endswith("feedback")]
    assert any(not torch.equal(r0["buffers"][n], r1["buffers"][n]) for n in fbs)


def test_grape_skips_the_step_on_every_rank_when_one_rank_is_not_finite(ranks):
    """A NaN in rank 1's shard: the reduced count of non-finite inputs stops the step on both ranks, which keep
    the same feedback (that of the first step) and both count the skip."""
    first0, second0 = ranks[0]["nonfinite"]
    first1, second1 = ranks[1]["nonfinite"]
    for n, b in second0.items():
        assert torch.equal(b, second1[n]), n
        if n.endswith("feedback") or n.endswith("feedback_velocity") or n.endswith("feedback_steps"):
            assert torch.equal(b, first0[n]), n
    stepping = [n[:-len("steps")] for n, b in first0.items() if n.endswith("feedback_steps") and int(b) == 1]
    assert len(stepping) == 2  # the two layers after the first
    assert all(int(second0[n + "skips"]) == 1 and int(second1[n + "skips"]) == 1 for n in stepping)
    assert all(int(first0[n + "skips"]) == 0 for n in stepping)


def test_sync_feedback_settings():
    model = bio_ext.convert(W.mlp(), "grape", seed=0)
    assert distributed.sync_feedback(model, None) is model
    assert distributed.feedback_group(model) is None
    distributed.sync_feedback(model)  # back to auto: no process group here, so none
    assert distributed.feedback_group(model) is None
    with pytest.raises(ConfigError, match="'auto', None/False or a torch.distributed process group"):
        distributed.sync_feedback(model, "world")
    assert distributed.rank_seed(5, 0) == 5 and distributed.rank_seed(5, 1) != 5


# --------------------------------------------------------------------------- the YAML runner under torchrun

RUNNER_CONFIG = """
experiment: {{name: tiny, output_dir: {out}, seeds: [0], deterministic: true}}
data: {{dataset: digits, val_fraction: 0.1, limit: 256}}
model:
  architecture: mlp
  kwargs: {{hidden: [32, 32], activation: tanh}}
  mode: {{type: [dfa, bwbpf], mode_options: {{bwbpf: {{blocks: 2}}}}}}
training:
  hyperparameters: {{epochs: 2, batch_size: 64}}
  optimizer: {{type: sgd, lr: 0.1}}
  lr_scheduler: {{type: none}}
  metrics: {{display_iterations: 3}}
infrastructure: {{gpus: {gpus}, threads: 1}}
"""


def _runner_config(path, out, gpus="-1"):
    path.write_text(RUNNER_CONFIG.format(out=out, gpus=gpus), encoding="utf-8")
    return path


def _check_runner_outputs(single, root):
    """Rank 0 alone wrote results, checkpoints and TensorBoard; the dfa run continued from the single process's
    checkpoint, bwbpf trained from scratch on 2 ranks (32 examples each per global batch of 64), and both end
    with the metrics of an uninterrupted single-process run (accuracies the same, losses to float rounding:
    DDP averages the two halves' gradients)."""
    import json

    from bio_ext.benchmark.tracking import read_scalars

    for run in single.runs:
        folder = root / run.mode / "seed_0"
        got = json.loads((folder / "results.json").read_text())
        assert got["status"] == "finished" and len(got["history"]) == 2
        for mine, ref in zip(got["history"], run.history):
            assert mine["step"] == ref["step"] == 4 * mine["epoch"]  # 256 examples, global batches of 64
            for k in ("train_accuracy", "val_accuracy", "test_accuracy"):
                assert mine[k] == pytest.approx(ref[k], abs=0.5), k  # less than one example of 144 / 360 / 256
            for k in ("train_loss", "val_loss", "test_loss"):
                assert mine[k] == pytest.approx(ref[k], rel=1e-4), k
        assert torch.load(folder / "checkpoint.pt", weights_only=False)["epoch"] == 2
        scalars = read_scalars(str(folder / "tensorboard"))
        assert [s for s, _ in scalars["epoch/val_accuracy"]] == [1, 2]
    # the run the 2 ranks trained from scratch: one events file (rank 0's)
    assert len(list((root / "bwbpf" / "seed_0" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (root / "summary.md").is_file()


def test_runner_in_2_ranks_resumes_a_single_process_checkpoint_and_matches_one_process(ranks, runner_dirs):
    """``python -m bio_ext.benchmark CONFIG --resume`` in 2 processes with torchrun's environment (the runner
    starts the gloo group from it) on an experiment whose dfa run a single process left after epoch 1 and
    whose bwbpf run has not started: see :func:`_check_runner_outputs`."""
    assert [r["runner_exit"] for r in ranks] == [0, 0]
    assert not any(r["runner_group_left"] for r in ranks)  # the runner ends the group it started
    single, _, root = runner_dirs
    _check_runner_outputs(single, root)


@pytest.mark.slow  # ~25 s on 2 cores: torchrun's agent and two fresh interpreters
def test_runner_under_torchrun(tmp_path, runner_dirs):
    """The same sweep launched by ``torchrun --standalone --nproc_per_node=2 -m bio_ext.benchmark CONFIG``."""
    import subprocess
    import sys

    single = runner_dirs[0]
    cfg_path = _runner_config(tmp_path / "ddp.yaml", tmp_path / "ddp", gpus="[0, 1]")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(bio_ext.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bio_ext.benchmark", str(cfg_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| dfa |") == 1, proc.stdout  # rank 0 alone prints the table
    _check_runner_outputs(single, tmp_path / "ddp" / "tiny")
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]  # finished runs: skipped on both ranks
    _check_runner_outputs(single, tmp_path / "ddp" / "tiny")


def test_runner_devices_and_batches_per_process(monkeypatch):
    """torchrun's local rank r takes gpus[r]; one device for several processes, or fewer devices than
    processes, is refused with the fix; the global batch must split evenly between the processes."""
    from bio_ext.benchmark import parallel
    from bio_ext.benchmark.build import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device([0, 1], local_rank=1, world=2) == torch.device("cuda:1")
    assert select_device([0, 1]) == torch.device("cuda:0")  # one process: the first (with a warning)
    assert select_device(-1, local_rank=1, world=2) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"list one device per process \(e.g. gpus: \[0, 1\]\)"):
        select_device(0, local_rank=0, world=2)
    with pytest.raises(ConfigError, match="names 1 device"):
        select_device([1], local_rank=0, world=2)
    ranks = parallel.Ranks(rank=1, world=2, local_rank=1)
    assert parallel.batches_per_rank(64, ranks) == 32
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        parallel.batches_per_rank(65, ranks)
    # the shards of a DistributedSampler: every other position of the epoch's order, the first one repeated
    order = torch.arange(10, 15)
    assert parallel.Ranks(0, 2).shard(order, 0).tolist() == [10, 12, 14]
    assert parallel.Ranks(1, 2).shard(order, 0).tolist() == [11, 13, 10]
    one = parallel.Ranks()
    assert not one.active and one.shard(order, 3) is order and one.sums((1.5, 2), "cpu") == [1.5, 2]


def test_blockwise_early_backward_is_refused_under_ddp(ranks):
    """early_backward back-propagates inside the forward, where DDP cannot reduce: refused with the fix."""
    for r in ranks:
        assert r["early_backward"] is not None and "early_backward=False (the default)" in r["early_backward"]


def test_reduce_tensors(ranks):
    """One all-reduce for several tensors, each back in its shape and dtype (sum, or mean)."""
    for r in ranks:
        total, pair, mean = r["reduced"]
        assert total.item() == 1.0 and pair.tolist() == [1, 2] and pair.dtype == torch.long
        assert mean.tolist() == [1.0]
    assert distributed.reduce_tensors([torch.ones(2)], None)[0].tolist() == [1.0, 1.0]
