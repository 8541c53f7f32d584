"""Frozen weights: GrAPE alignment (cosine of injected signal with the true input gradient, per hidden
injection point) after `steps` steps, perturb_layers all vs cycle. tanh MLP 100-W^depth-10, teacher labels."""
import sys, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..")); import bio_ext
torch.set_num_threads(1)
depth, width, steps, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for pl in ("all", "cycle"):
    torch.manual_seed(0)
    layers, d = [], 100
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]; d = width
    model = nn.Sequential(*layers, nn.Linear(d, 10))
    torch.manual_seed(1); teacher = nn.Linear(100, 10)
    def make():
        x = torch.randn(batch, 100)
        with torch.no_grad(): return x, teacher(x).argmax(1)
    conv = bio_ext.convert(model, "grape", seed=0, options={"perturb_layers": pl})
    for _ in range(steps):
        x, y = make(); F.cross_entropy(conv(x), y).backward()
    al = bio_ext.alignment(conv, *make())
    cs = [round(v.cosine, 2) for v in al.values() if v.cosine is not None]
    print(f"depth {depth} width {width} steps {steps} batch {batch} {pl}: mean {sum(cs)/len(cs):.3f} per layer {cs}", flush=True)
