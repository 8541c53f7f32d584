"""benchmarks/table1_compare.py prints a runner experiment beside the right column of the GrAPE seed's Table 1: the
column comes from the experiment's config, and a --column that contradicts it is refused."""

import json
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def table1_compare(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import table1_compare
    return table1_compare


def experiment(root: Path, dataset, architecture, mode="grape", seed=0, accuracy=49.14) -> Path:
    """A finished one-seed run (``mode``, ``seed``) of the runner's layout, under a config of ``dataset`` and
    ``architecture``."""
    root.mkdir()
    if dataset is not None:
        (root / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset},
                                                          "model": {"architecture": architecture}}))
    run = root / mode / f"seed_{seed}"
    run.mkdir(parents=True)
    history = [{"epoch": k, "step": 10 * k, "test_accuracy": accuracy - 20 + k} for k in range(1, 21)]
    (run / "results.json").write_text(json.dumps({"status": "finished", "final": {"test_accuracy": accuracy},
                                                  "history": history}))
    return root


@pytest.mark.parametrize("dataset, architecture, paper", [("cifar10", "mlp", "52.8"), ("cifar10", "cnn", "72.07"),
                                                          ("mnist", "mlp", "98.35"), ("mnist", "cnn", "98.7")])
def test_the_papers_column_is_read_from_the_experiments_config(table1_compare, tmp_path, capsys, dataset,
                                                               architecture, paper):
    root = experiment(tmp_path / "exp", dataset, architecture)
    assert table1_compare.main([str(root)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| grape | 1 | 20 | 49.14 |") and row.endswith(f"| {paper} |")


def test_a_column_that_contradicts_the_config_is_refused(table1_compare, tmp_path, capsys):
    root = experiment(tmp_path / "exp", "cifar10", "mlp")
    assert table1_compare.main([str(root), "--column", "mnist_mlp"]) == 2
    captured = capsys.readouterr()
    assert "cifar10_mlp" in captured.err and "drop --column" in captured.err and captured.out == ""


def test_without_a_config_the_column_must_be_named(table1_compare, tmp_path, capsys):
    root = experiment(tmp_path / "exp", None, None)
    assert table1_compare.main([str(root)]) == 2
    assert "pass --column" in capsys.readouterr().err
    assert table1_compare.main([str(root), "--column", "cifar10_mlp"]) == 0
    assert capsys.readouterr().out.strip().endswith("| 52.8 |")


def test_several_experiments_are_merged_by_mode(table1_compare, tmp_path, capsys):
    roots = [experiment(tmp_path / "dfa0", "cifar10", "cnn", "dfa", 0, 60.0),
             experiment(tmp_path / "grape0", "cifar10", "cnn", "grape", 0, 62.0),
             experiment(tmp_path / "grape1", "cifar10", "cnn", "grape", 1, 64.0)]
    assert table1_compare.main([str(r) for r in roots]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert rows == ["| dfa | 1 | 20 | 60.00 | 60.00 | - | 69.34 |",
                    "| grape | 2 | 20 | 63.00 ± 1.41 | 62.00, 64.00 | - | 72.07 |"]


def test_a_mode_and_seed_found_in_two_experiments_is_refused(table1_compare, tmp_path, capsys):
    roots = [experiment(tmp_path / "a", "cifar10", "cnn"), experiment(tmp_path / "b", "cifar10", "cnn")]
    assert table1_compare.main([str(r) for r in roots]) == 2
    captured = capsys.readouterr()
    assert "grape/seed_0 is in both" in captured.err and captured.out == ""


def test_experiments_of_different_columns_are_refused(table1_compare, tmp_path, capsys):
    roots = [experiment(tmp_path / "a", "cifar10", "cnn"), experiment(tmp_path / "b", "cifar10", "mlp", "dfa")]
    assert table1_compare.main([str(r) for r in roots]) == 2
    captured = capsys.readouterr()
    assert "different Table 1 settings" in captured.err and "cifar10_mlp" in captured.err and captured.out == ""


def test_plot_draws_the_merged_runs_figures(table1_compare, tmp_path, capsys):
    roots = [experiment(tmp_path / "dfa0", "cifar10", "cnn", "dfa", 0, 60.0),
             experiment(tmp_path / "grape0", "cifar10", "cnn", "grape", 0, 62.0)]
    prefix = tmp_path / "img" / "column"
    assert table1_compare.main([str(r) for r in roots] + ["--plot", str(prefix)]) == 0
    for name in ("accuracy", "alignment"):
        image = Path(f"{prefix}_{name}.png")
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    assert "| grape | 1 | 20 | 62.00 |" in capsys.readouterr().out
