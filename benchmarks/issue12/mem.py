import sys, torch; sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..")); import bio_ext
from bio_ext.benchmark.models import build_model
from bio_ext.convert import feedback_layers
torch.set_num_threads(1)
print("| model | shape | conv feedback entries (all convs) | largest conv layer | + Linear feedback |\n|---|---|---:|---:|---:|")
for name, size in (("vgg16", 32), ("vgg16_bn", 32), ("alexnet", 64)):
    m = build_model(name, num_classes=10, input_shape=(3, size, size))
    for shape in ("kernel", "dense", "factored"):
        c = bio_ext.convert(m, "dfa", conv_feedback=shape, input_shape=(3, size, size))
        conv = [l.feedback.numel() for _, l in feedback_layers(c) if isinstance(l, bio_ext.layers.FeedbackConv2d)]
        lin = [l.feedback.numel() for _, l in feedback_layers(c) if not isinstance(l, bio_ext.layers.FeedbackConv2d)]
        print(f"| {name} {size}x{size} | {shape} | {sum(conv):,} | {max(conv):,} | {sum(lin):,} |", flush=True)
        del c
