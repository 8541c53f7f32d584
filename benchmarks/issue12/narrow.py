"""What ``deep.py`` and ``oracle.py`` share: the narrow VGG proxy of issue 12's third to fifth rounds, and a dataset
bundle as tensors."""
import torch
import torch.nn as nn


def narrow_vgg(name: str, width: int, seed: int) -> nn.Module:
    """torchvision's VGG layout (``vgg16``, ``vgg16_bn``, ``vgg11``) with every width divided by ``width``: the same
    depth and the same 49-fold replicated classifier input at 32x32, torchvision's initialisation (classifier: normal
    std 0.01, zero bias), drawn after ``torch.manual_seed(seed)``."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    cfg = {"vgg16": "D", "vgg16_bn": "D", "vgg11": "A"}[name]
    torch.manual_seed(seed)
    model = VGG(make_layers([c if c == "M" else c // width for c in cfgs[cfg]], batch_norm=name.endswith("_bn")),
                num_classes=10)
    c, h = 512 // width, 4096 // width
    model.classifier = nn.Sequential(nn.Linear(c * 49, h), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(h, h),
                                     nn.ReLU(True), nn.Dropout(0.5), nn.Linear(h, 10))
    for m in model.classifier:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model


def as_tensors(bundle, ntest: int):
    """``(xs, ys, xt, yt)``: every training example of a :class:`~bio_ext.benchmark.data.DataBundle` and its first
    ``ntest`` test examples, stacked."""
    def stack(ds, n):
        return torch.stack([ds[i][0] for i in range(n)]), torch.tensor([int(ds[i][1]) for i in range(n)])
    return (*stack(bundle.train, len(bundle.train)), *stack(bundle.test, ntest))
