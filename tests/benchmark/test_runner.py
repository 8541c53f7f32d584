"""bio_ext.benchmark.runner on the synthetic set: every output written, TensorBoard tags read back,
resume equals an uninterrupted run, determinism, alignment logging does not change training, NaN
stop, biotorch files run with overrides, the CLI."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bio_ext.benchmark import __main__ as cli
from bio_ext.benchmark import runner as runner_mod
from bio_ext.benchmark.runner import run_experiment
from bio_ext.benchmark.schema import BenchmarkConfig, apply_overrides, load_config
from bio_ext.benchmark.tracking import read_scalars
from bio_ext.errors import NonFiniteLossError, RunExistsError

FIXTURES = Path(__file__).parent / "fixtures"


#: the MLP below has two hidden units before its output layer: two blocks at most
BLOCKWISE_OPTIONS = {"bwbpf": {"blocks": 2}}


def config(tmp_path, modes=("fa", "grape"), epochs=2, seeds=(0,), **metrics):
    return BenchmarkConfig.from_dict({
        "experiment": {"name": "t", "output_dir": str(tmp_path), "seeds": list(seeds), "deterministic": True},
        "data": {"dataset": "synthetic", "limit": 96, "val_fraction": 0.25,
                 "options": {"input_shape": [12], "num_classes": 3, "train_size": 128, "test_size": 64}},
        "model": {"architecture": "mlp", "kwargs": {"hidden": [16, 16]}, "mode": {"type": list(modes),
                 "mode_options": {m: o for m, o in BLOCKWISE_OPTIONS.items() if m in modes}}},
        "training": {"hyperparameters": {"epochs": epochs, "batch_size": 16},
                     "optimizer": {"type": "adam", "lr": 1e-2},
                     "lr_scheduler": {"type": "exponential", "gamma": 0.9},
                     "metrics": {"display_iterations": 2, **metrics}},
        "infrastructure": {"gpus": -1},
    })


def final_state(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)["model"]


def test_a_run_writes_every_output(tmp_path):
    res = run_experiment(config(tmp_path, epochs=1))
    out = tmp_path / "t"
    for f in ("config.yaml", "summary.md", "accuracy.png", "alignment.png"):
        assert (out / f).is_file(), f
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for mode in ("fa", "grape"):
        run = out / mode / "seed_0"
        for f in ("config.yaml", "results.json", "metrics.csv", "alignment.json", "timings.json", "checkpoint.pt",
                  "best_model.pt"):
            assert (run / f).is_file(), (mode, f)
        data = json.loads((run / "results.json").read_text())
        assert data["status"] == "finished" and data["mode"] == mode and len(data["history"]) == 1
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        assert float(rows[0]["test_accuracy"]) == data["final"]["test_accuracy"]
        # 96 train examples, batch 16: 6 steps; the test set has 64 examples
        assert data["history"][0]["step"] == 6 and data["final"]["test_accuracy"] * 64 / 100 == \
            pytest.approx(round(data["final"]["test_accuracy"] * 64 / 100))
        assert load_config(str(run / "config.yaml")).modes == [mode]
    assert "| fa | 1 | 1 |" in res.table and "| grape | 1 | 1 |" in res.table
    assert res.table in (out / "summary.md").read_text()


def test_tensorboard_tags_are_written_and_hold_finite_values(tmp_path):
    run_experiment(config(tmp_path, epochs=1))
    layers = ("1", "3", "5")  # Flatten, Linear, Tanh, Linear, Tanh, Linear
    expected = {
        "fa": {f"alignment/{q}/{n}" for q in ("update", "feedback", "norm_ratio") for n in layers}
        | {f"alignment/signal/{n}" for n in layers[1:]},
        "grape": {f"alignment/update/{n}" for n in layers}
        | {f"alignment/{q}/{n}" for q in ("signal", "estimate") for n in layers[1:]},
    }
    common = {"train/loss", "train/accuracy", "train/lr", "train/step_time_ms", "epoch/train_loss",
              "epoch/train_accuracy", "epoch/val_accuracy", "epoch/val_loss", "epoch/test_accuracy",
              "epoch/test_loss", "epoch/lr", "epoch/val_top5", "epoch/test_top5"}
    for mode, tags in expected.items():
        scalars = read_scalars(str(tmp_path / "t" / mode / "seed_0" / "tensorboard"))
        assert set(scalars) == common | tags, mode
        for tag, points in scalars.items():
            assert points and all(math.isfinite(v) for _, v in points), tag
        assert [s for s, _ in scalars["train/loss"]] == [0, 2, 4]  # every display_iterations steps
        assert [s for s, _ in scalars["alignment/update/5"]] == [0, 2, 4]
        results = json.loads((tmp_path / "t" / mode / "seed_0" / "results.json").read_text())
        assert scalars["epoch/test_accuracy"][0][1] == pytest.approx(results["final"]["test_accuracy"])
        # the output layer trains on its true gradient in every mode
        assert all(v < 1e-2 for _, v in scalars["alignment/update/5"])
        assert all(0 <= v <= 180 for _, v in scalars["alignment/update/1"])
    # feedback drawn independently of the weights: FA starts near orthogonal in every layer
    fa = read_scalars(str(tmp_path / "t" / "fa" / "seed_0" / "tensorboard"))
    assert all(60 < fa[f"alignment/feedback/{n}"][0][1] < 120 for n in layers)


@pytest.mark.parametrize("mode", ["grape", "brsf", "bwbpf"])
def test_resume_after_a_kill_ends_like_an_uninterrupted_run(tmp_path, mode):
    whole = run_experiment(config(tmp_path / "a", modes=(mode,), epochs=3))

    class Killed(Exception):
        pass

    def kill(run, epoch):
        if epoch == 1:
            raise Killed

    cfg_b = config(tmp_path / "b", modes=(mode,), epochs=3)
    with pytest.raises(Killed):
        run_experiment(cfg_b, on_epoch_end=kill)
    partial = json.loads((tmp_path / "b" / "t" / mode / "seed_0" / "results.json").read_text())
    assert partial["status"] == "running" and len(partial["history"]) == 1
    resumed = run_experiment(cfg_b, resume=True)
    assert resumed.runs[0].history == whole.runs[0].history
    assert resumed.runs[0].alignment == whole.runs[0].alignment
    a, b = final_state(tmp_path / "a" / "t" / mode / "seed_0"), final_state(tmp_path / "b" / "t" / mode / "seed_0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_kill_in_the_middle_of_an_epoch_ends_like_an_uninterrupted_run(tmp_path):
    whole = run_experiment(config(tmp_path / "a", modes=("dfa",), epochs=2))

    class Killed(Exception):
        pass

    class Bar:  # a progress bar whose 9th update (epoch 2, step 3 of 6) kills the run
        calls = 0

        def __init__(self, **kwargs):
            pass

        def update(self, n):
            Bar.calls += 1
            if Bar.calls == 9:
                raise Killed

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    cfg_b = config(tmp_path / "b", modes=("dfa",), epochs=2)
    with pytest.raises(Killed):
        run_experiment(cfg_b, progress=Bar)
    resumed = run_experiment(cfg_b, resume=True)
    assert resumed.runs[0].history == whole.runs[0].history
    a, b = final_state(tmp_path / "a" / "t" / "dfa" / "seed_0"), final_state(tmp_path / "b" / "t" / "dfa" / "seed_0")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the steps logged before the kill in epoch 2 are replaced, not duplicated
    steps = [s for s, _ in read_scalars(str(tmp_path / "b" / "t" / "dfa" / "seed_0" / "tensorboard"))["train/loss"]]
    assert steps == [0, 2, 4, 6, 8, 10]


def test_two_runs_with_the_same_seed_write_identical_results(tmp_path):
    run_experiment(config(tmp_path, modes=("grape",)))
    path = tmp_path / "t" / "grape" / "seed_0" / "results.json"
    first = path.read_bytes()
    import shutil
    shutil.rmtree(tmp_path / "t")
    run_experiment(config(tmp_path, modes=("grape",)))
    assert path.read_bytes() == first


def test_alignment_logging_does_not_change_training(tmp_path):
    on = run_experiment(config(tmp_path / "on", modes=("grape", "brsf", "bwbpf")))
    off = run_experiment(config(tmp_path / "off", modes=("grape", "brsf", "bwbpf"), layer_alignment=False,
                                weight_ratio=False, tensorboard=False))
    assert all(r.alignment and all(row["layers"] for row in r.alignment) for r in on.runs)
    assert not any(r.alignment for r in off.runs)
    for a, b in zip(on.runs, off.runs):
        assert a.history == b.history
        sa, sb = final_state(a.run_dir), final_state(b.run_dir)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_finished_run_is_skipped_on_resume_and_an_existing_one_is_not_overwritten(tmp_path):
    cfg = config(tmp_path, modes=("fa",), epochs=1)
    run_experiment(cfg)
    ck = tmp_path / "t" / "fa" / "seed_0" / "checkpoint.pt"
    stamp = ck.stat().st_mtime_ns
    again = run_experiment(cfg, resume=True)
    assert ck.stat().st_mtime_ns == stamp and again.runs[0].status == "finished"
    with pytest.raises(RunExistsError, match="--resume"):
        run_experiment(cfg)


def test_a_nan_loss_stops_the_run_keeps_the_last_checkpoint_and_the_sweep_goes_on(tmp_path, monkeypatch):
    calls = {"n": 0}

    class Poisoned(nn.CrossEntropyLoss):
        def forward(self, out, y):
            calls["n"] += 1
            loss = super().forward(out, y)
            return loss * float("nan") if calls["n"] == 8 else loss  # step 7: epoch 2's second step

    monkeypatch.setattr(runner_mod.nn, "CrossEntropyLoss", Poisoned)
    res = run_experiment(config(tmp_path, modes=("dfa", "fa"), layer_alignment=False, weight_ratio=False))
    dfa, fa = res.runs
    assert dfa.status == "diverged" and fa.status == "finished"
    assert "the training loss is nan at epoch 2, step 7" in dfa.message
    ck_path = tmp_path / "t" / "dfa" / "seed_0" / "checkpoint.pt"
    assert str(ck_path) in dfa.message
    ck = torch.load(ck_path, weights_only=False)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    stored = json.loads((tmp_path / "t" / "dfa" / "seed_0" / "results.json").read_text())
    assert stored["status"] == "diverged" and len(stored["history"]) == 1 and stored["message"] == dfa.message
    assert "| dfa | 0 (1 diverged) |" in res.table


def test_the_error_names_the_epoch_and_step(tmp_path, monkeypatch):
    class Inf(nn.CrossEntropyLoss):
        def forward(self, out, y):
            return super().forward(out, y) * float("inf")

    monkeypatch.setattr(runner_mod.nn, "CrossEntropyLoss", Inf)
    cfg = config(tmp_path, modes=("fa",))
    run = runner_mod.Run(cfg, "fa", 0, tmp_path / "r")
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at epoch 1, step 0.*no checkpoint was written yet"):
        run.execute()


@pytest.mark.parametrize("fixture", ["biotorch_cifar10_le_net_dfa.yaml", "biotorch_cifar10_resnet20_fa_adam.yaml"])
def test_biotorch_files_run_with_overrides(tmp_path, fixture):
    from bio_ext.benchmark.schema import read_yaml
    doc = apply_overrides(read_yaml(str(FIXTURES / fixture)), [
        f"experiment.output_dir={tmp_path}", "training.hyperparameters.epochs=1", "data.limit=16",
        "data.dataset=synthetic", "data.options={input_shape: [3, 32, 32], num_classes: 10, train_size: 64, "
        "test_size: 16}", "training.hyperparameters.batch_size=16"])
    res = run_experiment(BenchmarkConfig.from_dict(doc))  # gpus: 0 without CUDA runs on the CPU
    assert [r.status for r in res.runs] == ["finished"] and len(res.runs[0].history) == 1


def test_cli_runs_a_config_with_overrides_and_prints_the_table(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(config(tmp_path).to_yaml())
    code = cli.main([str(path), "--override", "training.hyperparameters.epochs=1", "model.mode.type=dfa",
                     "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| dfa | 1 | 1 |" in out and (tmp_path / "t" / "dfa" / "seed_0" / "results.json").is_file()
    assert cli.main([str(path), "--override", "training.optimizer.lr=-1"]) == 2
    assert "training.optimizer.lr: must be > 0, got -1" in capsys.readouterr().err


def test_a_missing_data_folder_fails_before_any_output_naming_the_files(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    doc = config(tmp_path).to_dict()
    doc["data"].update({"dataset": "mnist", "dataset_path": str(tmp_path / "nowhere"), "options": {}})
    path.write_text(BenchmarkConfig.from_dict(doc).to_yaml())
    assert cli.main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path / "nowhere") in err
    assert not (tmp_path / "t").exists()


def test_bad_model_options_fail_before_any_output(tmp_path):
    from bio_ext.errors import InvalidOptionError
    doc = config(tmp_path).to_dict()
    doc["model"]["kwargs"] = {"hiden": [4]}
    with pytest.raises(InvalidOptionError, match="hiden"):
        run_experiment(BenchmarkConfig.from_dict(doc))
    assert not (tmp_path / "t").exists()


def test_biotorch_constrain_weights_and_gradient_clip(tmp_path):
    doc = config(tmp_path, modes=("fa",), epochs=1).to_dict()
    doc["model"]["mode"]["options"] = {"constrain_weights": True, "gradient_clip": True, "init": "xavier"}
    doc["training"]["optimizer"]["lr"] = 0.5  # large steps: the weights would grow without the constraint
    res = run_experiment(BenchmarkConfig.from_dict(doc))
    assert res.runs[0].status == "finished"
    from bio_ext.benchmark.runner import build_run_model, load_data
    cfg = BenchmarkConfig.from_dict(doc).for_run("fa", 0)
    initial = build_run_model(cfg, "fa", 0, load_data(cfg))  # xavier weights, zero biases
    assert all(torch.count_nonzero(m.bias) == 0 for _, m in __import__("bio_ext").feedback_layers(initial))
    trained = final_state(res.runs[0].run_dir)
    for name, p in initial.named_parameters():
        if name.endswith("weight"):
            assert torch.allclose(trained[name].norm(), p.detach().norm(), rtol=1e-5), name


def test_blockwise_runs_through_the_runner_with_its_heads_in_the_checkpoint(tmp_path):
    res = run_experiment(config(tmp_path, modes=("bwbpf",), epochs=1))
    run = res.runs[0]
    assert run.status == "finished" and math.isfinite(run.history[-1]["train_loss"])
    state = final_state(tmp_path / "t" / "bwbpf" / "seed_0")
    assert any(k.startswith("bio_ext_aux_heads") or "aux" in k for k in state), list(state)
    # issue 13 item 7: each layer's local-loss gradient against the end-to-end one (was: nothing logged)
    rows = run.alignment
    assert [r["step"] for r in rows] == [0, 2, 4] and all(set(r["layers"]) == {"1", "3", "5"} for r in rows)
    assert all(r["layers"]["5"]["update"] < 1e-2 for r in rows)  # the output layer: the global loss in both
    assert all(1 < r["layers"][n]["update"] <= 180 for r in rows for n in ("1", "3"))
    scalars = read_scalars(str(tmp_path / "t" / "bwbpf" / "seed_0" / "tensorboard"))
    assert {f"alignment/update/{n}" for n in ("1", "3", "5")} <= set(scalars)


def test_bad_blockwise_options_are_reported_with_their_path(tmp_path):
    from bio_ext.errors import ConfigError
    cfg = config(tmp_path, modes=("bwbpf",)).to_dict()
    cfg["model"]["mode"]["mode_options"] = {"bwbpf": {"blocks": 0, "isolate": "yes"}}
    with pytest.raises(ConfigError) as exc:
        BenchmarkConfig.from_dict(cfg)
    text = str(exc.value)
    assert "model.mode.mode_options.bwbpf.blocks" in text and "model.mode.mode_options.bwbpf.isolate" in text
