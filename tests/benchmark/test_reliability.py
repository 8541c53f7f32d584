"""Issue 17, the YAML runner's items: no non-finite state in a "good" checkpoint, diverging runs
flagged, one typed line per bad input file (the sweep goes on where one run is bad), overrides
narrowing the sweep, YAML 1.2 numbers, ``--check`` catching an impossible ``scale``, and Ctrl-C.

Every configuration is tiny (the synthetic set, 32 training examples, batches of 16: two steps per
epoch; no alignment probe, no TensorBoard) so the whole file runs in seconds."""

import gzip
import json
import logging
import struct
from pathlib import Path

import pytest
import torch

from bio_ext.benchmark import __main__ as cli
from bio_ext.benchmark import runner as runner_mod
from bio_ext.benchmark.data import MNIST_FILES, load_dataset
from bio_ext.benchmark.runner import run_experiment
from bio_ext.benchmark.schema import BenchmarkConfig, load_config
from bio_ext.errors import BioExtError, ConfigError, DataNotFoundError

ROOT = Path(__file__).resolve().parents[2]


def tiny(tmp_path, modes=("fa", "dfa"), epochs=1, lr=1e-2, **mode):
    """A sweep of ``modes`` on 32 synthetic examples, two steps per epoch."""
    return BenchmarkConfig.from_dict({
        "experiment": {"name": "t", "output_dir": str(tmp_path), "seeds": [0]},
        "data": {"dataset": "synthetic", "limit": 32, "val_fraction": 0.25,
                 "options": {"input_shape": [6], "num_classes": 3, "train_size": 48, "test_size": 16}},
        "model": {"architecture": "mlp", "kwargs": {"hidden": [8]}, "mode": {"type": list(modes), **mode}},
        "training": {"hyperparameters": {"epochs": epochs, "batch_size": 16},
                     "optimizer": {"type": "adam", "lr": lr},
                     "metrics": {"layer_alignment": False, "weight_ratio": False, "tensorboard": False}},
    })


def finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def one_line(text):
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ---------------------------------------------------------------------------------------- 1. divergence


@pytest.mark.parametrize("poison", ["gradient", "feedback"])
def test_a_finite_loss_with_non_finite_gradients_or_feedback_never_makes_a_good_checkpoint(tmp_path, monkeypatch,
                                                                                           poison):
    """The last step of epoch 2 (step 3) gets NaN gradients (its loss is finite) or leaves a NaN
    feedback buffer: the run is diverged, and the checkpoint it keeps (epoch 1's) is finite."""

    class Poisoning(runner_mod.StepRules):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.steps = 0

        def after_backward(self, model):
            super().after_backward(model)
            if poison == "gradient" and self.steps == 3:
                next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))

        def after_step(self, model):
            super().after_step(model)
            if poison == "feedback" and self.steps == 3:
                next(b for n, b in model.named_buffers() if n.endswith("feedback")).fill_(float("nan"))
            self.steps += 1

    monkeypatch.setattr(runner_mod, "StepRules", Poisoning)
    res = run_experiment(tiny(tmp_path, modes=("fa",), epochs=2))
    run = res.runs[0]
    assert run.status == "diverged", run.status
    assert "not finite" in run.message and str(run.run_dir / "checkpoint.pt") in run.message
    ck = torch.load(run.run_dir / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and finite(ck["model"])
    assert finite(torch.load(run.run_dir / "best_model.pt", weights_only=True))
    stored = json.loads((run.run_dir / "results.json").read_text())
    assert stored["status"] == "diverged" and len(stored["history"]) == 1
    assert "| fa | 0 (1 diverged) |" in res.table


def test_a_loss_that_grows_without_bound_is_diverged_not_finished(tmp_path):
    """lr=1e6: the loss stays finite (about 1e6) but is far above the untrained model's."""
    res = run_experiment(tiny(tmp_path, modes=("dfa",), epochs=2, lr=1e6))
    run = res.runs[0]
    assert run.status == "diverged"
    assert f"{runner_mod.DIVERGENCE_FACTOR:g} times" in run.message and "training.optimizer.lr" in run.message
    assert json.loads((run.run_dir / "results.json").read_text())["status"] == "diverged"
    assert "dfa seed 0: diverged" in (tmp_path / "t" / "summary.md").read_text()


# ---------------------------------------------------------------------------------------- 2. typed errors


def test_a_binary_config_file_is_one_line_naming_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    with pytest.raises(ConfigError):
        load_config(str(path))
    assert cli.main([str(path), "--check"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "UTF-8" in line


def _write_idx(path, data, magic):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(">" + "I" * data.dim(), *data.shape))
        f.write(bytes(data.flatten().tolist()))


@pytest.mark.parametrize("damage", ["truncated gzip", "short payload", "not gzip"])
def test_a_damaged_idx_file_is_one_line_naming_the_file(tmp_path, damage):
    folder = tmp_path / damage.replace(" ", "_")
    folder.mkdir()
    for name, n, magic in zip(MNIST_FILES, (5, 5, 3, 3), (2051, 2049, 2051, 2049)):
        shape = (n, 28, 28) if magic == 2051 else (n,)
        _write_idx(folder / name, torch.zeros(shape, dtype=torch.uint8), magic)
    bad = folder / MNIST_FILES[0]
    raw = bad.read_bytes()
    if damage == "truncated gzip":
        bad.write_bytes(raw[:len(raw) // 2])
    elif damage == "short payload":
        _write_idx(bad, torch.zeros(4, 28, 28, dtype=torch.uint8), 2051)  # the header says 4; cut to 3.5
        with gzip.open(bad, "rb") as f:
            whole = f.read()
        with gzip.open(bad, "wb") as f:
            f.write(whole[:-392])
    else:
        bad.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", str(folder))
    line = one_line(str(info.value))
    assert str(bad) in line and "replace" in line.lower()


def _block_output(tmp_path, monkeypatch, how):
    """Make ``tmp_path/out`` impossible to write: a file in the way, or permission denied."""
    out = tmp_path / "out"
    if how == "file in the way":
        out.write_text("a file, not a folder")
    else:
        import pathlib
        real = pathlib.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(out)):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    return out


@pytest.mark.parametrize("how", ["file in the way", "permission denied"])
def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, capsys, how):
    path = tmp_path / "c.yaml"
    path.write_text(tiny(tmp_path / "out").to_yaml())
    _block_output(tmp_path, monkeypatch, how)
    assert cli.main([str(path), "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(tmp_path / "out") in line and "experiment.output_dir" in line


def _torch_file_cut_short(path):
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


@pytest.mark.parametrize("file, damage", [
    ("checkpoint.pt", "truncated"), ("checkpoint.pt", "garbage"), ("checkpoint.pt", "empty"),
    ("results.json", "truncated"), ("results.json", "not a mapping"),
])
def test_a_damaged_run_file_on_resume_fails_that_run_and_the_sweep_goes_on(tmp_path, file, damage):
    cfg = tiny(tmp_path)
    run_dir = tmp_path / "t" / "fa" / "seed_0"
    run_dir.mkdir(parents=True)
    bad = run_dir / file
    if damage == "truncated":
        if file == "checkpoint.pt":
            _torch_file_cut_short(bad)
        else:
            bad.write_text('{"format": 1, "status": "fini')
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01 not a checkpoint")
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.write_text("[1, 2]")
    res = run_experiment(cfg, resume=True)
    fa, dfa = res.runs
    assert (fa.status, dfa.status) == ("failed", "finished")
    one_line(fa.message)
    assert str(bad) in fa.message and "delete" in fa.message
    summary = (tmp_path / "t" / "summary.md").read_text()
    assert "| fa | 0 (1 failed) |" in summary and "| dfa | 1 | 1 |" in summary
    assert f"fa seed 0: failed: {fa.message}" in summary


def test_resuming_a_folder_of_another_configuration_fails_that_run_and_leaves_its_files(tmp_path):
    run_experiment(tiny(tmp_path, modes=("fa",)))
    stored = (tmp_path / "t" / "fa" / "seed_0" / "results.json").read_bytes()
    res = run_experiment(tiny(tmp_path, lr=2e-2), resume=True)
    assert [r.status for r in res.runs] == ["failed", "finished"]
    assert "different configuration" in res.runs[0].message
    assert (tmp_path / "t" / "fa" / "seed_0" / "results.json").read_bytes() == stored


def test_a_run_folder_that_cannot_be_made_fails_that_run_and_the_sweep_goes_on(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "fa").write_text("a file where the mode's folder goes")
    res = run_experiment(tiny(tmp_path))
    assert [r.status for r in res.runs] == ["failed", "finished"]
    one_line(res.runs[0].message)
    assert str(tmp_path / "t" / "fa") in res.runs[0].message
    assert (tmp_path / "t" / "summary.md").is_file()


def test_a_failed_run_makes_the_cli_exit_1_with_its_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(tiny(tmp_path).to_yaml())
    (tmp_path / "t" / "fa" / "seed_0").mkdir(parents=True)
    (tmp_path / "t" / "fa" / "seed_0" / "checkpoint.pt").write_bytes(b"junk")
    assert cli.main([str(path), "--no-progress", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- 3. overrides


@pytest.mark.parametrize("name", ["mnist_mlp", "mnist_cnn", "cifar10_mlp", "cifar10_cnn"])
def test_an_override_leaving_a_mode_out_ignores_its_options_with_a_note(name, caplog, capsys):
    path = str(ROOT / "configs" / f"table1_{name}.yaml")
    with caplog.at_level(logging.INFO, logger="bio_ext.benchmark"):
        cfg = load_config(path, ["model.mode.type=[bp, dfa]"])
    assert cfg.modes == ["bp", "dfa"] and cfg.model.mode.mode_options == {}
    assert any("bwbpf" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    assert cli.main([path, "--check", "--override", "model.mode.type=[bp, dfa]"]) == 0
    assert "# valid: 2 run(s)" in capsys.readouterr().out


def test_a_mode_options_name_that_is_no_mode_at_all_is_still_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  mode:\n    type: [bp, grape]\n    mode_options: {grpe: {feedback_lr: 0.1}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["model.mode.type=[bp]"])
    assert any("model.mode.mode_options.grpe" in p and "'grape'" in p for p in info.value.problems)


# ---------------------------------------------------------------------------------------- 4. numbers


def test_numbers_without_a_dot_in_mode_options_and_convert_are_numbers(tmp_path):
    """``1e-3`` is a float in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string)."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  mode:\n    type: [grape, dfa]\n"
                    "    mode_options: {grape: {feedback_lr: 1e-3, momentum: 5E-1}}\n    convert: {scale: 2e0}\n"
                    "training: {optimizer: {lr: 3e-4}}\n")
    cfg = load_config(str(path), ["model.mode.convert.seed=7"])
    assert cfg.model.mode.mode_options_for("grape") == {"feedback_lr": 1e-3, "momentum": 0.5}
    assert cfg.model.mode.convert_config("dfa").scale == 2.0 and cfg.training.optimizer.lr == 3e-4
    again = load_config(str(path), ["model.mode.convert.scale=1e-1"])
    assert again.model.mode.convert_config("dfa").scale == 0.1
    assert BenchmarkConfig.from_yaml(cfg.to_yaml()) == cfg
    assert BenchmarkConfig.from_yaml(path.read_text()).model.mode.convert == {"scale": 2.0}


# ---------------------------------------------------------------------------------------- scale


@pytest.mark.parametrize("scale", [".inf", "1e300", "1.0e+300"])
def test_check_refuses_a_scale_the_feedback_cannot_hold(tmp_path, capsys, scale):
    path = tmp_path / "c.yaml"
    path.write_text(tiny(tmp_path, modes=("dfa",)).to_yaml())
    assert cli.main([str(path), "--check", "--override", f"model.mode.convert.scale={scale}"]) == 2
    assert "model.mode.convert.scale: must be a finite positive number" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_scale_within_bounds_still_passes():
    cfg = BenchmarkConfig.from_dict({"model": {"mode": {"type": "dfa", "convert": {"scale": 1e30}}}})
    assert cfg.model.mode.convert_config("dfa").scale == 1e30
    with pytest.raises(ConfigError, match="convert.scale"):
        BenchmarkConfig.from_dict({"model": {"mode": {"type": "dfa", "convert": {"scale": float("inf")}}}})


# ---------------------------------------------------------------------------------------- 5. Ctrl-C


def test_ctrl_c_keeps_what_finished_writes_the_summary_and_exits_130(tmp_path, monkeypatch, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(tiny(tmp_path, modes=("fa", "dfa", "grape")).to_yaml())
    real = runner_mod.Run._step

    def step(self, st, *args, **kwargs):
        if self.mode == "dfa" and st.step == 1:
            raise KeyboardInterrupt
        return real(self, st, *args, **kwargs)

    monkeypatch.setattr(runner_mod.Run, "_step", step)
    try:
        code = cli.main([str(path), "--no-progress"])
    except KeyboardInterrupt:  # today's code: the interrupt escapes with its traceback
        pytest.fail("KeyboardInterrupt escaped the CLI")
    assert code == 130
    line = one_line(capsys.readouterr().err)
    assert "interrupted" in line and "--resume" in line and "1 of 3" in line
    out = tmp_path / "t"
    summary = (out / "summary.md").read_text()
    assert "| fa | 1 | 1 |" in summary and "dfa/seed_0" in summary and "grape/seed_0" in summary
    assert json.loads((out / "fa" / "seed_0" / "results.json").read_text())["status"] == "finished"
    assert not (out / "grape").exists()


def test_ctrl_c_in_the_library_raises_keyboard_interrupt_after_writing_the_summary(tmp_path, monkeypatch):
    def interrupt(run, epoch):
        if run.mode == "dfa":
            raise KeyboardInterrupt

    try:
        run_experiment(tiny(tmp_path), on_epoch_end=interrupt)
    except KeyboardInterrupt as e:
        assert [r.mode for r in e.result.runs] == ["fa"] and isinstance(e, BioExtError) is False
    else:
        pytest.fail("no KeyboardInterrupt")
    assert "| fa | 1 | 1 |" in (tmp_path / "t" / "summary.md").read_text()
