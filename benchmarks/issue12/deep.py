"""Issue 12 scratch experiment: DFA/GrAPE on torchvision nets, CIFAR-10 subset; logs loss, logit RMS, weight norms,
activation RMS, Adam |m|/sqrt(v) per layer. --transform patches the session projections (center/exnorm/rms/radial)."""
"""Scratch: DFA/GrAPE on torchvision nets at 32x32 CIFAR-10 subset; logs what grows."""
import argparse, json, math, sys, os
import torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
import bio_ext
from bio_ext.benchmark.data import load_dataset
from bio_ext.benchmark.models import build_model
from bio_ext.convert import feedback_layers
from narrow import as_tensors, narrow_vgg  # benchmarks/issue12/narrow.py

p = argparse.ArgumentParser()
p.add_argument("--model", default="vgg16"); p.add_argument("--mode", default="dfa")
p.add_argument("--n", type=int, default=2000); p.add_argument("--epochs", type=int, default=2)
p.add_argument("--seed", type=int, default=0); p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--bs", type=int, default=64); p.add_argument("--convert", default="{}")
p.add_argument("--options", default="{}"); p.add_argument("--transform", default="none")
p.add_argument("--constrain", action="store_true"); p.add_argument("--size", type=int, default=32)
p.add_argument("--width", type=int, default=1); p.add_argument("--threads", type=int, default=2); p.add_argument("--tanmode", default="example"); p.add_argument("--dataset", default="cifar10"); p.add_argument("--kwargs", default="{}"); p.add_argument("--ntest", type=int, default=1000)
a = p.parse_args()
from bio_ext.session import FeedbackSession
_orig = FeedbackSession.receive_error
def _recv(self, e):
    _orig(self, e)
    if a.transform == "none" or not self.proj:
        return
    out = []
    for q in self.proj:
        if a.transform == "center":
            q = q - q.mean(0, keepdim=True)
        elif a.transform == "exnorm":
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12) * e.norm(dim=1, keepdim=True)
        elif a.transform == "rms":
            q = q / q.pow(2).mean().sqrt().clamp_min(1e-12) * e.pow(2).mean().sqrt()
        out.append(q)
    self.proj = tuple(out)
FeedbackSession.receive_error = _recv
torch.set_num_threads(a.threads)  # --threads 1: two runs side by side on the 2 cores
if a.tanmode == "batch":
    # with --convert '{"tangential": true}': each example's signal orthogonal to its own input (the library's) and
    # the batch's mean signal orthogonal to the batch's mean input: g_n - a_n x_n - c xbar, the N + 1 numbers solved
    # in closed form (the least-squares projection onto those constraints; checked against a solve in float64)
    _L, _C = sys.modules["bio_ext.layers.linear"], sys.modules["bio_ext.layers.conv2d"]
    def _batch_tangential(g, x, lead=1):
        rows = 1
        for s_ in g.shape[:lead]:
            rows *= s_
        g2, x2 = g.reshape(rows, -1), x.detach().reshape(rows, -1).to(g.dtype)
        tiny = torch.finfo(g.dtype).tiny
        xx = (x2 * x2).sum(1).clamp_min(tiny)
        xbar = x2.mean(0)
        gx, xxbar = (g2 * x2).sum(1), x2 @ xbar
        num = (g2 @ xbar).sum() - (gx * xxbar / xx).sum()
        den = rows * (xbar @ xbar) - (xxbar * xxbar / xx).sum()
        c = torch.where(den > 1e-6 * rows * (xbar @ xbar), num / den.clamp_min(tiny), torch.zeros_like(num))
        return (g2 - ((gx - c * xxbar) / xx)[:, None] * x2 - c * xbar[None]).reshape(g.shape)
    _L.tangential = _C.tangential = _batch_tangential
b = load_dataset(a.dataset, os.environ["BIO_EXT_CIFAR10_ROOT"] if a.dataset == "cifar10" else __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", "..", "shared", "data", "mnist"),
                 val_fraction=0.0, seed=a.seed, limit=a.n)
torch.manual_seed(a.seed)
ishape = (3, a.size, a.size) if a.dataset == "cifar10" else tuple(b.input_shape)
model = build_model(a.model, num_classes=10, input_shape=ishape, **json.loads(a.kwargs))
if a.width > 1:  # the same depth and layout with every width divided by --width (cheap proxy for long runs)
    model = narrow_vgg(a.model, a.width, a.seed)
kw = json.loads(a.convert); opts = json.loads(a.options)
if a.mode != "bp":
    if kw.get("conv_feedback", "kernel") != "kernel":
        kw.setdefault("input_shape", list(ishape))
    model = bio_ext.convert(model, a.mode, seed=a.seed, options=opts, **kw)
def _radial_hook(mod, args):
    x = args[0]
    if torch.is_grad_enabled() and x.requires_grad:
        xd = x.detach()
        import torch.autograd.forward_ad as fwAD
        xd = fwAD.unpack_dual(xd).primal
        def h(g, xd=xd):
            n = g.shape[0]; g2, x2 = g.reshape(n, -1), xd.reshape(n, -1)
            coef = (g2 * x2).sum(1, keepdim=True) / x2.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
            return (g2 - coef * x2).reshape(g.shape)
        x.register_hook(h)
layers = feedback_layers(model) if a.mode != "bp" else [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
act = {}
if a.transform == "radial":
    for n, m in layers:
        m.register_forward_pre_hook(_radial_hook)
for n, m in layers:
    m.register_forward_hook(lambda mod, i, o, n=n: act.__setitem__(n, float(o.detach().pow(2).mean().sqrt())))
opt = torch.optim.Adam(model.parameters(), lr=a.lr)
w0 = {n: m.weight.detach().norm() for n, m in layers}
g = torch.Generator().manual_seed(a.seed)
X, Y = b.train.x if hasattr(b.train, "x") else None, None
xs, ys, xt, yt = as_tensors(b, a.ntest)
if a.size != 32:
    xs = F.interpolate(xs, size=(a.size, a.size), mode="bilinear", align_corners=False)
    xt = F.interpolate(xt, size=(a.size, a.size), mode="bilinear", align_corners=False)
print("ARGS", vars(a), flush=True)
step = 0
for ep in range(a.epochs):
    model.train(); perm = torch.randperm(len(xs), generator=g); tot = 0.0; cnt = 0
    for i in range(0, len(xs), a.bs):
        idx = perm[i:i + a.bs]; x, y = xs[idx], ys[idx]
        out = model(x); loss = F.cross_entropy(out, y)
        opt.zero_grad(); loss.backward(); opt.step(); step += 1
        if a.constrain:
            with torch.no_grad():
                for n, m in layers:
                    m.weight.mul_(w0[n] / m.weight.norm())
        tot += float(loss) * len(idx); cnt += len(idx)
        if step % 10 == 0:
            print(f"step {step} loss {float(loss):.3f} logit_rms {float(out.detach().pow(2).mean().sqrt()):.2f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(xt[j:j+250]).argmax(1) == yt[j:j+250]).sum()) for j in range(0, a.ntest, 250)) / a.ntest
    wn = {n: round(float(m.weight.norm()), 2) for n, m in layers}
    cosg = {n: round(float(m.__dict__.get("grape_cos", float("nan"))), 3) for n, m in layers if "grape_cos" in m.__dict__}
    print(f"EPOCH {ep+1} train_loss {tot/cnt:.3f} test_acc {100*acc:.1f}", flush=True)
    print("  wnorm", json.dumps(wn)); print("  act_rms(out of layer, last train batch)", json.dumps({k: round(v, 2) for k, v in act.items()}))
    if cosg: print("  grape_cos", json.dumps(cosg))
    coh = {}
    for n, m in layers:
        st = opt.state.get(m.weight, {})
        if "exp_avg" in st:
            t = float(st["step"]); m1 = st["exp_avg"] / (1 - 0.9 ** t); v = st["exp_avg_sq"] / (1 - 0.999 ** t)
            coh[n] = round(float((m1.abs() / (v.sqrt() + 1e-8)).mean()), 3)
    print("  adam_|m|/sqrt(v)", json.dumps(coh))
    sys.stdout.flush()
