"""bio_ext.benchmark.models: every model builds for its dataset's shape, converts to DFA, and has the
published structure and parameter count."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bio_ext
from bio_ext.benchmark.models import ACTIVATIONS, available_models, build_model
from bio_ext.errors import ConfigError, InvalidOptionError, UnknownNameError

torchvision = pytest.importorskip("torchvision")


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def n_weighted(m):
    return sum(isinstance(x, (nn.Linear, nn.Conv2d)) for x in m.modules())


# (model, input shape of the dataset it is meant for, kwargs); 7 classes so no width 10 is hard-coded
CASES = [
    ("mlp", (1, 28, 28), {}),
    ("mlp", (784,), {"hidden": [32], "activation": "relu"}),
    ("mlp", (1, 8, 8), {"hidden": [16, 16]}),
    ("mlp", (16,), {"hidden": []}),
    ("cnn", (1, 28, 28), {}),
    ("cnn", (784,), {}),
    ("cnn", (1, 8, 8), {}),
    ("cnn", (3, 32, 32), {"activation": "relu"}),
    ("cnn", (3, 32, 32), {"channels": [64, 128], "hidden": 384}),
    ("le_net", (1, 28, 28), {}),
    ("le_net", (1, 8, 8), {}),
    ("le_net", (3, 32, 32), {}),
    ("resnet20", (3, 32, 32), {}),
    ("resnet20", (1, 28, 28), {"shortcut": "B"}),
    ("resnet20", (1, 8, 8), {}),
    ("resnet56", (3, 32, 32), {}),
    ("resnet18", (3, 32, 32), {"small_input": True}),
    ("resnet18", (1, 28, 28), {}),
    ("mobilenet_v3_small", (3, 32, 32), {}),
    ("squeezenet1_1", (1, 28, 28), {}),
]
# models whose last layer is not an nn.Linear: bio_ext takes the DFA error at the model's return value
CONVERT_OPTIONS = {"squeezenet1_1": {"output_layer": "", "output_dim": 7}}


@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _ in CASES])
def test_model_gives_n_by_classes_and_converts_to_dfa_with_finite_gradients(name, shape, kwargs):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, **kwargs)
    x, y = torch.randn(3, *shape), torch.tensor([0, 3, 6])
    assert model(x).shape == (3, 7)
    plain = n_weighted(model)
    conv = bio_ext.convert(model, "dfa", **CONVERT_OPTIONS.get(name, {}))
    assert len(bio_ext.feedback_layers(conv)) == plain
    F.cross_entropy(conv(x), y).backward()
    grads = [p.grad for p in conv.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_registry_has_seed_biotorch_and_every_torchvision_classifier():
    names = set(available_models())
    assert {"mlp", "cnn", "le_net", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
            "hf:vit", "hf:gpt2", "hf:bert"} <= names
    assert set(torchvision.models.list_models(module=torchvision.models)) <= names


HF_CASES = [("hf:vit", (3, 32, 32), {}), ("hf:vit", (1, 28, 28), {"hidden_size": 32, "num_attention_heads": 2}),
            ("hf:gpt2", (1, 28, 28), {}), ("hf:gpt2", (16,), {"token_dim": 4}), ("hf:bert", (1, 8, 8), {})]


@pytest.mark.parametrize("name,shape,kwargs", HF_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s, _ in HF_CASES])
def test_hf_model_gives_n_by_classes_and_converts_to_dfa(name, shape, kwargs):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape, **kwargs)
    x, y = torch.randn(3, *shape), torch.tensor([0, 3, 6])
    assert model(x).shape == (3, 7)
    conv = bio_ext.convert(model, "dfa")
    assert len(bio_ext.feedback_layers(conv)) == n_weighted(model) + sum(
        type(m).__name__ == "Conv1D" for m in model.modules())
    F.cross_entropy(conv(x), y).backward()
    unused = ("wte.weight", "word_embeddings.weight")   # inputs_embeds bypasses the word embedding
    for n, p in conv.named_parameters():
        if not n.endswith(unused):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if name != "hf:vit":
        assert model.token_dim == kwargs.get("token_dim", shape[0] * shape[-1])


def test_hf_options_are_checked():
    pytest.importorskip("transformers")
    vit = build_model("hf:vit", num_classes=10, input_shape=(3, 32, 32), num_hidden_layers=3, patch_size=8)
    assert vit.model.config.num_hidden_layers == 3 and vit.model.config.image_size == 32
    assert vit.model.config.num_labels == 10
    with pytest.raises(InvalidOptionError, match="patch_size"):
        build_model("hf:vit", num_classes=10, input_shape=(3, 32, 32), patch_size=5)
    with pytest.raises(InvalidOptionError, match="'depth'.*hidden_size"):
        build_model("hf:bert", num_classes=10, input_shape=(3, 32, 32), depth=5)
    with pytest.raises(InvalidOptionError, match="token_dim=5"):
        build_model("hf:gpt2", num_classes=10, input_shape=(3, 32, 32), token_dim=5)


# ----------------------------------------------------------------------------- published structures

def test_seed_mlp_is_784_1024_1024_10_tanh():
    m = build_model("mlp", num_classes=10, input_shape=(1, 28, 28))
    lin = [x for x in m if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(784, 1024), (1024, 1024), (1024, 10)]
    assert [type(x) for x in m] == [nn.Flatten, nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    assert n_params(m) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_activation_is_configurable(activation):
    m = build_model("mlp", num_classes=3, input_shape=(5,), hidden=[4, 4], activation=activation)
    acts = [x for x in m if not isinstance(x, (nn.Linear, nn.Flatten))]
    assert len(acts) == 2 and all(type(a) is ACTIVATIONS[activation] for a in acts)


def _grape_benchmark_cnn():
    """The CNN benchmarks/grape_mnist.py used before it moved into bio_ext.benchmark.models."""
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 10))


def test_seed_cnn_on_flat_mnist_is_the_grape_benchmark_cnn_with_the_same_initialization():
    torch.manual_seed(1)
    ours = build_model("cnn", num_classes=10, input_shape=(784,))
    after_ours = torch.rand(3)
    torch.manual_seed(1)
    old = _grape_benchmark_cnn()
    after_old = torch.rand(3)
    assert str(ours) == str(old)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), old.parameters()))
    assert torch.equal(after_ours, after_old)   # building draws no extra random numbers


def test_le_net_5_has_61706_parameters_and_the_cifar_variant_128842():
    mnist = build_model("le_net", num_classes=10, input_shape=(1, 28, 28))
    c1, c2, c3, f1, f2 = 6 * 25 + 6, 16 * 6 * 25 + 16, 120 * 16 * 25 + 120, 120 * 84 + 84, 84 * 10 + 10
    assert n_params(mnist) == c1 + c2 + c3 + f1 + f2 == 61706
    assert mnist[0].padding == (2, 2)   # 28x28 padded to LeNet-5's 32x32
    cifar = build_model("le_net", num_classes=10, input_shape=(3, 32, 32))
    assert n_params(cifar) == (3 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 128 + 128) + (128 * 256 + 256) \
        + (256 * 10 + 10) == 128842


@pytest.mark.parametrize("depth,params", [(20, 269722), (32, 464154), (44, 658586), (56, 853018)])
def test_cifar_resnet_depth_and_parameter_count_match_he_et_al(depth, params):
    m = build_model(f"resnet{depth}", num_classes=10, input_shape=(3, 32, 32))
    assert n_weighted(m) == depth          # 6n+2 weighted layers: stem + 6n convs + fc (option A adds none)
    assert n_params(m) == params
    published = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6}[depth]
    assert abs(n_params(m) - published) / published < 0.01


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "le_net_mnist", "le_net_cifar"])
def test_parameter_counts_equal_biotorchs_architectures(name):
    small_resnet = pytest.importorskip("biotorch.models.small_resnet")
    le_net = pytest.importorskip("biotorch.models.le_net")
    if name.startswith("resnet"):
        theirs, ours = getattr(small_resnet, name)(), build_model(name, num_classes=10, input_shape=(3, 32, 32))
    else:
        theirs = getattr(le_net, name)()
        shape = (1, 32, 32) if name.endswith("mnist") else (3, 32, 32)
        ours = build_model("le_net", num_classes=10, input_shape=shape)
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in theirs.parameters())


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    m = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    block = m.layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    b = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32), shortcut="B")
    assert n_weighted(b) == 22 and isinstance(b.layer2[0].shortcut[0], nn.Conv2d)


def test_torchvision_small_input_stem_and_channel_adaptation():
    m = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), small_input=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    plain = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)
    gray = build_model("resnet18", num_classes=10, input_shape=(1, 28, 28))
    assert gray.conv1.in_channels == 1 and gray.conv1.kernel_size == (7, 7) and gray.conv1.stride == (2, 2)
    assert n_params(plain) - n_params(gray) == 64 * 2 * 49
    assert plain.fc.out_features == 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_b_16", "vgg11", "efficientnet_b0", "convnext_tiny", "swin_t", "densenet121"])
def test_large_torchvision_models_build_for_cifar_and_convert(name):
    m = build_model(name, num_classes=10, input_shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    if name == "swin_t":   # bio_ext cannot convert torchvision's ShiftedWindowAttention (own weight tensors)
        with pytest.raises(bio_ext.UnsupportedModuleError, match="ShiftedWindowAttention"):
            bio_ext.convert(m, "dfa")
        return
    conv = bio_ext.convert(m, "dfa")
    F.cross_entropy(conv(x), torch.tensor([1, 2])).backward()


@pytest.mark.slow
def test_torchvision_model_too_large_for_the_input_is_explained():
    with pytest.raises(InvalidOptionError, match="cannot take inputs of shape"):
        build_model("inception_v3", num_classes=10, input_shape=(3, 32, 32))


# ----------------------------------------------------------------------------- errors

def test_unknown_model_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        build_model("resnet7", num_classes=10, input_shape=(3, 32, 32))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    assert "resnet20" in str(e.value) and "mlp" in str(e.value) and "vgg11" in str(e.value)


@pytest.mark.parametrize("name,kwargs,needles", [
    ("mlp", {"width": 3}, ["'width'", "hidden", "activation"]),
    ("mlp", {"activation": "swish"}, ["swish", "tanh", "relu"]),
    ("mlp", {"hidden": [0]}, ["hidden"]),
    ("cnn", {"hidden": [3], "channels": [6]}, ["hidden=[3]", "channels=[6]", "two positive ints"]),
    ("cnn", {"width": 3}, ["'width'", "activation", "channels", "hidden"]),
    ("le_net", {"variant": "imagenet"}, ["mnist", "cifar"]),
    ("resnet20", {"shortcut": "C"}, ["'A'", "'B'"]),
    ("resnet20", {"depth": 3}, ["'depth'", "shortcut"]),
    ("resnet18", {"colour": 1}, ["colour", "small_input", "zero_init_residual"]),
    ("vgg11", {"small_input": True}, ["small_input", "ResNet family"]),
    ("resnet18", {"weights": "DEFAULT"}, ["'weights'", "weights=None"]),
])
def test_bad_model_options_raise_a_typed_error_naming_the_valid_ones(name, kwargs, needles):
    with pytest.raises(InvalidOptionError) as e:
        build_model(name, num_classes=10, input_shape=(3, 32, 32), **kwargs)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_bad_shapes_and_classes_are_reported_together_or_explained():
    with pytest.raises(InvalidOptionError) as e:
        build_model("mlp", num_classes=0, input_shape=(3, -1), foo=1)
    assert len(e.value.problems) == 3
    with pytest.raises(InvalidOptionError, match="cannot take inputs of shape"):
        build_model("cnn", num_classes=10, input_shape=(1, 2, 2))
    with pytest.raises(InvalidOptionError, match="flatten=False"):
        build_model("resnet20", num_classes=10, input_shape=(3072,))
