"""Forward-gradient estimate quality vs width, depth, batch, directions (seed Figure 2 idea).
cos_ex: mini-batch cosine of g_l (the estimate) with the true input gradient (flattened over the batch);
cos_B: cosine of the feedback-space estimate sum_n e_n g_n^T with sum_n e_n grad_n^T (what a
dense/Linear feedback can align with). Layer: the input of the second Linear (first hidden activity)."""
import sys, itertools, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..")); import bio_ext
torch.set_num_threads(1)
def net(width, depth):
    layers, d = [], 32
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]; d = width
    return nn.Sequential(*layers, nn.Linear(d, 10))
def measure(width, depth, batch, K, draws=4):
    torch.manual_seed(0)
    m = net(width, depth).double()
    teacher = nn.Linear(32, 10).double()
    x = torch.randn(batch, 32, dtype=torch.float64); y = teacher(x).argmax(1)
    true = list(bio_ext.input_gradients(m, x, y).values())[0]
    conv = bio_ext.convert(m, "grape", options={"feedback_lr": 0.0, "keep_estimate": True, "directions": K}, seed=0)
    ce, cb = [], []
    for _ in range(draws):
        out = conv(x); out.retain_grad(); F.cross_entropy(out, y).backward()
        e = out.grad; g = conv[2].forward_gradient.reshape(true.shape)
        ce.append(F.cosine_similarity(g.reshape(-1), true.reshape(-1), dim=0))
        cb.append(F.cosine_similarity((e.t() @ g).reshape(-1), (e.t() @ true).reshape(-1), dim=0))
    return float(torch.stack(ce).mean()), float(torch.stack(cb).mean())
print("| width | depth | batch | K | cos_ex | cos_B |\n|---:|---:|---:|---:|---:|---:|")
grid = [(w, 2, 64, 1) for w in (64, 256, 1024)] + [(256, d, 64, 1) for d in (1, 4, 8)] + \
       [(256, 2, b, 1) for b in (8, 32, 256, 1024)] + [(256, 2, 64, k) for k in (4, 16)]
for w, d, b, k in grid:
    ce, cb = measure(w, d, b, k)
    print(f"| {w} | {d} | {b} | {k} | {ce:.3f} | {cb:.3f} |", flush=True)
