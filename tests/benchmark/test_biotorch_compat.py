"""biotorch configuration keys bio_ext takes as biotorch means them (issue 13, item 9)."""

import pytest
import torch

from bio_ext.benchmark.schema import BenchmarkConfig
from bio_ext.errors import BioExtError, DataNotFoundError


def _doc(**model):
    return {"experiment": {"name": "t"}, "data": {"dataset": "synthetic"},
            "model": {"architecture": "mlp", "mode": {"type": "bp"}, **model},
            "training": {"hyperparameters": {"epochs": 1, "batch_size": 8}}}


def test_weight_alignment_is_biotorchs_name_for_layer_alignment():
    doc = _doc()
    doc["training"]["metrics"] = {"weight_alignment": False}
    cfg = BenchmarkConfig.from_dict(doc)
    assert cfg.training.metrics.layer_alignment is False


def test_pretrained_loads_torchvisions_weights_from_the_hub_cache(tmp_path, monkeypatch):
    """The weights file is where torch.hub keeps downloads, so nothing is downloaded; the classifier,
    whose shape differs for the dataset's classes, keeps its fresh initialisation."""
    torchvision = pytest.importorskip("torchvision")
    from bio_ext.benchmark.models import build_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    reference = torchvision.models.squeezenet1_1(weights=None)
    torch.manual_seed(3)
    for p in reference.parameters():
        p.data.normal_()
    target = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = build_model("squeezenet1_1", num_classes=10, input_shape=(3, 64, 64), pretrained=True)
    ref = reference.state_dict()
    loaded = model.state_dict()
    same = [k for k in loaded if loaded[k].shape == ref[k].shape]
    assert len(same) == len(loaded) - 2  # all but the final conv's weight and bias (1000 -> 10 classes)
    assert all(torch.equal(loaded[k], ref[k]) for k in same)
    BenchmarkConfig.from_dict(_doc(pretrained=True))  # the schema takes it


def test_pretrained_weights_that_cannot_be_had_name_the_file_to_place(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from bio_ext.benchmark.models import build_model
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BioExtError, match="checkpoints"):
        build_model("squeezenet1_1", num_classes=10, input_shape=(3, 64, 64), pretrained=True)


def test_pretrained_for_a_model_without_published_weights_is_refused():
    from bio_ext.benchmark.models import build_model
    with pytest.raises(BioExtError, match="pretrained"):
        build_model("mlp", num_classes=10, input_shape=(8,), pretrained=True)


def test_a_missing_data_folder_names_the_yaml_key_to_set(tmp_path):
    from bio_ext.benchmark.data import load_dataset
    with pytest.raises(DataNotFoundError, match="data.dataset_path"):
        load_dataset("mnist", str(tmp_path / "nowhere"))
