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


def experiment(root: Path, dataset, architecture) -> Path:
    """A finished one-seed grape run of the runner's layout, under a config of ``dataset`` and ``architecture``."""
    root.mkdir()
    if dataset is not None:
        (root / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": dataset},
                                                          "model": {"architecture": architecture}}))
    run = root / "grape" / "seed_0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"status": "finished", "final": {"test_accuracy": 49.14},
                                                  "history": [{}] * 20}))
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
