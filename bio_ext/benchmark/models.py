"""Models for the benchmark runner, built by name for a dataset's ``num_classes`` and ``input_shape``.

    from bio_ext.benchmark.models import build_model
    model = build_model("mlp", num_classes=10, input_shape=(1, 28, 28), hidden=[1024, 1024], activation="tanh")
    model = build_model("resnet18", num_classes=10, input_shape=(3, 32, 32), small_input=True)

Registered names (:func:`available_models`):

``mlp``
    The GrAPE seed's Table 1 MLP: Flatten, then Linear + activation per entry of ``hidden``
    (default [1024, 1024]), then Linear to the classes. ``activation``: tanh (default, the seed's),
    relu, gelu, sigmoid, leaky_relu, elu, silu, identity. ``bias`` (True).
``cnn``
    The GrAPE seed's shallow CNN ("following LeNet-4"; the paper does not give widths, these are
    LeNet's): conv5x5(6, padding 2)-act-pool2-conv5x5(16)-act-pool2-fc120-act-fc. Flat square
    inputs (e.g. (784,)) are unflattened to (1, H, H) by the first module. When the image is too
    small for the unpadded second conv (H < 12, e.g. 8x8 digits) that conv gets padding 2.
    ``activation`` (tanh).
``le_net``
    biotorch's LeNet variants, reimplemented (biotorch's own classes ignore ``num_classes`` and the
    channel count). ``variant="mnist"`` (default for 1-channel input): LeNet-5, conv5x5(6)-pool-
    conv5x5(16)-pool-conv5x5(120)-fc84-fc; images smaller than 32x32 are zero-padded to 32 by the
    first conv's padding (28x28: padding 2), giving LeNet-5's 61,706 parameters for 10 classes.
    ``variant="cifar"`` (default otherwise): biotorch's ``le_net_cifar``, conv3x3(32)-pool-
    conv3x3(64)-pool-conv3x3(128)-global average pool-fc256-fc (128,842 parameters for 3x32x32, 10
    classes). ``activation`` (relu).
``resnet20`` / ``resnet32`` / ``resnet44`` / ``resnet56`` / ``resnet110``
    He et al. (2016) section 4.2 CIFAR ResNets (3 stages of 16/32/64 channels, 3x3 stem, global
    average pool), reimplemented, with ``shortcut="A"`` (default, the paper's parameter-free
    zero-padding shortcut, as biotorch's ``small_resnet``) or ``"B"`` (1x1 conv + BN projection).
    ResNet-20: 269,722 parameters (the paper's 0.27M), ResNet-56: 853,018 (0.85M); 10 classes, option A.
any torchvision classification model (``resnet18``, ``vgg11``, ``mobilenet_v3_small``, ``vit_b_16``, ...)
    Built with ``weights=None`` and ``num_classes``; other keyword arguments go to torchvision.
    Adaptations: a channel count other than 3 replaces the first Conv2d by one with that many input
    channels (same other settings); ``vit_*`` get ``image_size`` = the input size (must be a multiple
    of the patch size); ``googlenet`` / ``inception_v3`` default to ``aux_logits=False`` so the output
    is a plain tensor; ``small_input=True`` (ResNet family only: resnet*, resnext*, wide_resnet*)
    gives the customary CIFAR stem, a 3x3 stride-1 conv without the max pool.

``hf:vit`` / ``hf:gpt2`` / ``hf:bert`` (needs ``transformers``; built offline from a config, random init)
    Small defaults (hidden 64, 2 layers, 4 heads); any field of the transformers config may be passed
    (``hidden_size``, ``num_hidden_layers``, ...; GPT-2: ``n_embd``, ``n_layer``, ``n_head``).
    ``hf:vit`` is ``ViTForImageClassification`` (``patch_size`` 4 by default; must divide the image
    size) wrapped to return the logits tensor. ``hf:gpt2`` / ``hf:bert`` read the example as a
    sequence of tokens of ``token_dim`` features (default: one token per image row, C*W features; a
    flat vector is one token), embedded by a Linear, classified by a Linear head on the last token
    (GPT-2, causal) or the token mean (BERT); their word-embedding tables are unused.

Every build ends with one forward pass of zeros (eval mode, no grad, no random numbers drawn) that
checks the output is (N, num_classes); a model that cannot take the input shape raises
:class:`~bio_ext.errors.InvalidOptionError` saying so.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidOptionError, UnknownNameError

log = logging.getLogger(__name__)

__all__ = ["MODELS", "register_model", "available_models", "build_model", "ACTIVATIONS", "CifarResNet",
           "mlp", "cnn", "le_net"]

MODELS: Dict[str, Callable[..., nn.Module]] = {}

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU, "silu": nn.SiLU, "identity": nn.Identity,
}


def register_model(name: str):
    """Decorator: register ``fn(num_classes, input_shape, **kwargs) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered already")
        MODELS[name] = fn
        return fn

    return deco


def available_models() -> List[str]:
    return sorted(MODELS)


def _valid_kwargs(fn) -> Tuple[List[str], bool]:
    params = inspect.signature(fn).parameters
    names = [p for p, v in params.items() if p not in ("num_classes", "input_shape")
             and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]
    return names, any(v.kind == v.VAR_KEYWORD for v in params.values())


def build_model(name: str, *, num_classes: int, input_shape: Tuple[int, ...], **kwargs) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` outputs and per-example ``input_shape``."""
    if name not in MODELS:
        raise UnknownNameError("model", name, MODELS, hint="or register one with @register_model")
    fn = MODELS[name]
    problems = []
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        problems.append(f"num_classes={num_classes!r}: must be a positive int")
    shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else None
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        problems.append(f"input_shape={input_shape!r}: must be a non-empty tuple of positive ints, "
                        "e.g. (1, 28, 28) or (64,)")
    valid, open_ended = _valid_kwargs(fn)
    if not open_ended:
        for k in kwargs:
            if k not in valid:
                problems.append(f"unknown option {k!r} for model {name!r}; valid options: "
                                f"{', '.join(valid) if valid else '(none)'}")
    if problems:
        raise InvalidOptionError(problems, what=f"options for model {name!r}")
    try:
        model = fn(num_classes, shape, **kwargs)
    except RuntimeError as e:   # a builder's own shape probe failed: the input is too small for it
        raise _shape_error(name, shape, e) from e
    _check_output(model, name, num_classes, shape)
    log.info("model %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model


def _check_output(model: nn.Module, name: str, num_classes: int, shape: Tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as e:  # noqa: BLE001  (any failure here means the shape does not fit)
        raise _shape_error(name, shape, e) from e
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidOptionError([f"model {name!r} returned {got} for a batch of 2, expected (2, {num_classes})"],
                                 what=f"output of model {name!r}")


def _shape_error(name: str, shape: Tuple[int, ...], e: Exception) -> InvalidOptionError:
    return InvalidOptionError(
        [f"model {name!r} cannot take inputs of shape {shape}: {type(e).__name__}: {e}. Use a dataset "
         "with larger images, a model meant for small inputs (e.g. resnet20, le_net, small_input=True "
         "for torchvision ResNets), or flatten=False for image models"], what=f"input for model {name!r}")


def _activation(name: str, model: str) -> Callable[[], nn.Module]:
    if name not in ACTIVATIONS:
        raise InvalidOptionError([f"activation={name!r}: valid activations are {', '.join(sorted(ACTIVATIONS))}"],
                                 what=f"options for model {model!r}")
    return ACTIVATIONS[name]


def _image_shape(shape: Tuple[int, ...], model: str) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """(unflatten module or None, (C, H, W)); flat inputs must be square single-channel images."""
    if len(shape) == 3:
        return None, shape
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        s = math.isqrt(shape[0])
        return nn.Unflatten(1, (1, s, s)), (1, s, s)
    raise InvalidOptionError([f"model {model!r} needs (C, H, W) images or flat square ones, got input_shape {shape}; "
                              "load the dataset with flatten=False"], what=f"input for model {model!r}")


def _flat_size(features: nn.Module, shape: Tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


# --------------------------------------------------------------------------------------- seed models

@register_model("mlp")
def mlp(num_classes: int, input_shape: Tuple[int, ...], *, hidden: Sequence[int] = (1024, 1024),
        activation: str = "tanh", bias: bool = True) -> nn.Module:
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                        for h in hidden):
        raise InvalidOptionError([f"hidden={hidden!r}: must be a list of positive ints, e.g. [1024, 1024] "
                                  "([] gives a linear model)"], what="options for model 'mlp'")
    act = _activation(activation, "mlp")
    layers: List[nn.Module] = [nn.Flatten()]
    d = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(d, h, bias=bias), act()]
        d = h
    layers.append(nn.Linear(d, num_classes, bias=bias))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(num_classes: int, input_shape: Tuple[int, ...], *, activation: str = "tanh",
        channels: Sequence[int] = (6, 16), hidden: int = 120) -> nn.Module:
    """The seed's shallow CNN, LeNet-4-shaped: two 5x5 convolutions (``channels``), each followed by the activation
    and a 2x2 max-pool, then a hidden Linear of ``hidden`` units and the output layer. The defaults are LeNet's
    widths; the CIFAR-10 column needs wider ones (issue 12, item 5)."""
    act = _activation(activation, "cnn")
    problems = []
    if not isinstance(channels, (list, tuple)) or len(channels) != 2 or not all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in channels):
        problems.append(f"channels={channels!r}: must be two positive ints, e.g. [6, 16] (LeNet) or [64, 128]")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        problems.append(f"hidden={hidden!r}: must be a positive int, e.g. 120")
    if problems:
        raise InvalidOptionError(problems, what="options for model 'cnn'")
    unflatten, (c, h, w) = _image_shape(input_shape, "cnn")
    pad2 = 0 if min(h, w) >= 12 else 2
    head = [unflatten] if unflatten is not None else []
    c1, c2 = channels
    features = nn.Sequential(nn.Conv2d(c, c1, 5, padding=2), act(), nn.MaxPool2d(2),
                             nn.Conv2d(c1, c2, 5, padding=pad2), act(), nn.MaxPool2d(2), nn.Flatten())
    flat = _flat_size(features, (c, h, w))
    return nn.Sequential(*head, *features, nn.Linear(flat, hidden), act(), nn.Linear(hidden, num_classes))


# --------------------------------------------------------------------------------------- biotorch zoo

@register_model("le_net")
def le_net(num_classes: int, input_shape: Tuple[int, ...], *, variant: Optional[str] = None,
           activation: str = "relu") -> nn.Module:
    act = _activation(activation, "le_net")
    unflatten, (c, h, w) = _image_shape(input_shape, "le_net")
    variant = variant if variant is not None else ("mnist" if c == 1 else "cifar")
    if variant not in ("mnist", "cifar"):
        raise InvalidOptionError([f"variant={variant!r}: valid variants are 'mnist' (LeNet-5) and 'cifar' "
                                  "(biotorch's le_net_cifar)"], what="options for model 'le_net'")
    head = [unflatten] if unflatten is not None else []
    if variant == "mnist":
        pad = max(0, math.ceil((32 - min(h, w)) / 2))
        features = nn.Sequential(nn.Conv2d(c, 6, 5, padding=pad), act(), nn.MaxPool2d(2),
                                 nn.Conv2d(6, 16, 5), act(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 120, 5), act(), nn.Flatten())
        flat = _flat_size(features, (c, h, w))
        return nn.Sequential(*head, *features, nn.Linear(flat, 84), act(), nn.Linear(84, num_classes))
    pad = max(0, math.ceil((18 - min(h, w)) / 2))
    features = nn.Sequential(nn.Conv2d(c, 32, 3, padding=pad), act(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), act(), nn.MaxPool2d(2),
                             nn.Conv2d(64, 128, 3), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(*head, *features, nn.Linear(128, 256), act(), nn.Linear(256, num_classes))


class _PadShortcut(nn.Module):
    """Option A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, extra: int):
        super().__init__()
        self.extra = extra

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        if stride == 1 and cin == cout:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(cout - cin)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem (16), stages of n blocks at 16/32/64 channels."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1, shortcut))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.flatten(self.pool(out)))


def _cifar_resnet(depth: int, num_classes: int, input_shape: Tuple[int, ...], *, shortcut: str = "A") -> nn.Module:
    name = f"resnet{depth}"
    if shortcut not in ("A", "B"):
        raise InvalidOptionError([f"shortcut={shortcut!r}: valid shortcuts are 'A' (zero-padding, the paper's "
                                  "CIFAR choice) and 'B' (1x1 conv projection)"], what=f"options for model {name!r}")
    unflatten, (c, _, _) = _image_shape(input_shape, name)
    net = CifarResNet((depth - 2) // 6, num_classes, c, shortcut)
    return net if unflatten is None else nn.Sequential(unflatten, net)


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(functools.partial(_cifar_resnet, _depth))


# --------------------------------------------------------------------------------------- torchvision

_TV_RESNETS = ("resnet", "resnext", "wide_resnet")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for qual, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            1 if m.groups == 1 else in_channels, m.bias is not None, m.padding_mode)
            parent_name, _, attr = qual.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return
    raise InvalidOptionError([f"{type(model).__name__} has no Conv2d to adapt to {in_channels} input channels"],
                             what="input channels")


def _torchvision_model(tv_name: str, num_classes: int, input_shape: Tuple[int, ...], *, small_input: bool = False,
                       pretrained: bool = False, **kwargs) -> nn.Module:
    import torchvision

    if len(input_shape) != 3:
        raise InvalidOptionError([f"torchvision model {tv_name!r} needs (C, H, W) images, got input_shape "
                                  f"{input_shape}; load the dataset with flatten=False"],
                                 what=f"input for model {tv_name!r}")
    c, h, w = input_shape
    problems = []
    for k in ("weights", "num_classes"):
        if k in kwargs:
            problems.append(f"{k!r} is set by build_model (weights=None, num_classes from the dataset); remove it")
    if small_input and not tv_name.startswith(_TV_RESNETS):
        problems.append("small_input=True is only for the torchvision ResNet family (resnet*, resnext*, "
                        f"wide_resnet*), not {tv_name!r}; remove it")
    if problems:
        raise InvalidOptionError(problems, what=f"options for model {tv_name!r}")
    kw = dict(kwargs)
    if tv_name.startswith("vit_") and "image_size" not in kw:
        kw["image_size"] = h
    if tv_name in ("googlenet", "inception_v3"):
        kw.setdefault("aux_logits", False)
        kw.setdefault("init_weights", True)
    builder = torchvision.models.get_model_builder(tv_name)
    try:
        model = builder(weights=None, num_classes=num_classes, **kw)
    except (TypeError, ValueError) as e:
        raise InvalidOptionError([f"torchvision {tv_name!r} rejected options {sorted(kwargs)}: {e}. Valid options: "
                                  f"small_input (ResNet family), and the keyword arguments of "
                                  f"{_tv_class_params(builder)}"], what=f"options for model {tv_name!r}") from e
    if pretrained:
        _load_pretrained(model, tv_name)
    if small_input:
        model.conv1 = nn.Conv2d(c, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif c != 3:
        _replace_first_conv(model, c)
    return model


def _load_pretrained(model: nn.Module, tv_name: str) -> None:
    """torchvision's default weights for ``tv_name``, from torch.hub's cache (downloaded there when the
    machine has a network); tensors whose shape differs (the classifier, for another number of classes)
    keep their fresh initialisation, and the log says which."""
    import torch.hub
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(tv_name).DEFAULT
    except (ValueError, KeyError, AttributeError) as e:
        raise InvalidOptionError([f"pretrained: torchvision publishes no weights for {tv_name!r}; set "
                                  "model.pretrained: false"], what=f"options for model {tv_name!r}") from e
    file = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # noqa: BLE001  (no network, a proxy error, a damaged file...)
        raise InvalidOptionError([f"pretrained: the weights of {tv_name!r} could not be had ({type(e).__name__}: "
                                  f"{e}); put {weights.url} at {file}, or set model.pretrained: false"],
                                 what=f"options for model {tv_name!r}") from e
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    fresh = sorted(set(own) - set(usable))
    log.info("model %s: pretrained weights from %s; freshly initialised: %s", tv_name, file, fresh or "none")


def _tv_class_params(builder) -> str:
    try:
        model = builder(weights=None)
    except Exception:  # noqa: BLE001
        return "the torchvision model class"
    names = [p for p in inspect.signature(type(model).__init__).parameters if p not in ("self", "num_classes")]
    return f"{type(model).__name__} ({', '.join(names)})"


def _register_torchvision() -> None:
    try:
        import torchvision
    except ImportError:  # pragma: no cover
        log.info("torchvision not installed: its models are not registered")
        return
    for tv_name in torchvision.models.list_models(module=torchvision.models):
        if tv_name not in MODELS:
            fn = functools.partial(_torchvision_model, tv_name)
            MODELS[tv_name] = fn


_register_torchvision()


# --------------------------------------------------------------------------------------- HuggingFace (offline)

_HF_DEFAULTS = {
    # family: (config class, small defaults); sizes are kwargs, any other config field may be passed too
    "vit": ("ViTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              patch_size=4)),
    # vocab_size 1: the word embedding is never used (inputs_embeds), so keep it tiny
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1, bos_token_id=0,
                                eos_token_id=0)),
    "bert": ("BertConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=1)),
}


class HFImageClassifier(nn.Module):
    """``ViTForImageClassification`` returning the logits tensor (bio_ext and the runner want a tensor)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


class HFSequenceClassifier(nn.Module):
    """A transformers backbone over the example cut into tokens: Linear embedding of each token,
    the backbone (``inputs_embeds``), then a Linear head on the last token (GPT-2, causal) or the mean
    of the tokens (BERT). The backbone's word-embedding table is unused (it gets no gradient)."""

    def __init__(self, backbone: nn.Module, token_dim: int, hidden: int, num_classes: int, pool: str):
        super().__init__()
        self.token_dim, self.pool = token_dim, pool
        self.embed = nn.Linear(token_dim, hidden)
        self.backbone = backbone
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        tokens = x.reshape(len(x), -1, self.token_dim)
        h = self.backbone(inputs_embeds=self.embed(tokens)).last_hidden_state
        return self.head(h[:, -1] if self.pool == "last" else h.mean(1))


def _hf_model(family: str, num_classes: int, input_shape: Tuple[int, ...], *, token_dim: Optional[int] = None,
              **kwargs) -> nn.Module:
    name = f"hf:{family}"
    try:
        import transformers
    except ImportError as e:
        raise InvalidOptionError([f"{name} needs the transformers package: pip install 'bio_ext[hf]'"],
                                 what=f"model {name!r}") from e
    config_cls = getattr(transformers, _HF_DEFAULTS[family][0])
    fields = set(config_cls().to_dict())
    problems = [f"unknown option {k!r} for model {name!r}; valid options: token_dim (sequence models), and the "
                f"fields of {config_cls.__name__}, e.g. {', '.join(sorted(_HF_DEFAULTS[family][1]))}"
                for k in kwargs if k not in fields]
    if family == "vit" and token_dim is not None:
        problems.append(f"token_dim is for hf:gpt2 / hf:bert, not {name!r}; remove it")
    if problems:
        raise InvalidOptionError(problems, what=f"options for model {name!r}")
    cfg = dict(_HF_DEFAULTS[family][1], **kwargs)
    if family == "vit":
        _, (c, h, w) = _image_shape(input_shape, name)
        if len(input_shape) != 3 or h != w or h % cfg["patch_size"]:
            raise InvalidOptionError([f"hf:vit needs square (C, H, H) images with H a multiple of patch_size="
                                      f"{cfg['patch_size']}, got input_shape {input_shape}; pass patch_size=..."],
                                     what=f"input for model {name!r}")
        config = config_cls(image_size=h, num_channels=c, num_labels=num_classes, **cfg)
        return HFImageClassifier(transformers.ViTForImageClassification(config))
    total = math.prod(input_shape)
    if token_dim is None:   # images: one token per row (C * W features); vectors: the whole vector, one token
        token_dim = input_shape[0] * input_shape[2] if len(input_shape) == 3 else input_shape[-1]
    if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1 or total % token_dim:
        raise InvalidOptionError([f"token_dim={token_dim!r} must be a positive int dividing the example size {total}"],
                                 what=f"options for model {name!r}")
    if family == "gpt2":
        cfg.setdefault("n_positions", max(1024, total // token_dim))
        backbone, hidden, pool = transformers.GPT2Model(config_cls(**cfg)), cfg["n_embd"], "last"
    else:
        cfg.setdefault("max_position_embeddings", max(512, total // token_dim))
        backbone, hidden, pool = transformers.BertModel(config_cls(**cfg), add_pooling_layer=False), \
            cfg["hidden_size"], "mean"
    return HFSequenceClassifier(backbone, token_dim, hidden, num_classes, pool)


for _family in _HF_DEFAULTS:
    register_model(f"hf:{_family}")(functools.partial(_hf_model, _family))
