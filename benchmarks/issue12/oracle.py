"""Issue 12: how much better than DFA can a perfectly aligned direct feedback make a deep conv net train?

GrAPE turns each layer's feedback ``B_l`` toward the true gradient at the layer's input; the best any fixed linear map
of the output error can do is the least-squares fit ``B_l* = argmin_B E||e B - g_l||^2`` over the data. This script
trains with ``B_l`` *set* to that fit every step (``--feedback oracle``: what GrAPE's alignment would give if it were
perfect and instant; it cheats, with one backprop pass per step to measure ``g_l``), or with DFA's fixed random ``B``
(``--feedback random``; ``--mode grape``: GrAPE's own), under the same defaults otherwise (conv_feedback dense, radial
auto). The fit is a running one: ``S_ee`` and ``S_eg`` (the error's Gram matrix and its cross-products with the true
gradients) decay by ``--beta`` per step, and ``B* = (S_ee + ridge I)^-1 S_eg``. Prints the train loss, test accuracy
and, per layer, the cosine between ``e B`` and the true gradient over each batch (measured before the batch enters the
fit: held out). ``--ceiling`` keeps the same running fit beside any feedback without setting ``B`` to it, and prints
per layer the held-out cosine of the fitted ``e B*`` too: how close the best fixed linear map of the error could be to
the true gradient at that point of the run, the ceiling of DFA's and GrAPE's cosines.

    BIO_EXT_CIFAR10_ROOT=<pickles> python benchmarks/issue12/oracle.py --width 4 --n 6400 --epochs 8 --feedback oracle
"""
import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
import bio_ext  # noqa: E402
from bio_ext.benchmark.data import load_dataset  # noqa: E402
from bio_ext.convert import feedback_layers  # noqa: E402
from narrow import as_tensors, narrow_vgg  # noqa: E402  (benchmarks/issue12/narrow.py)

p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=4)
p.add_argument("--n", type=int, default=6400)
p.add_argument("--epochs", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--bs", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-4)
p.add_argument("--feedback", choices=("oracle", "random", "bp"), default="oracle")
p.add_argument("--mode", default="dfa")
p.add_argument("--conv-feedback", default="dense")
p.add_argument("--radial", default="auto")
p.add_argument("--beta", type=float, default=0.98)
p.add_argument("--ridge", type=float, default=1e-3)
p.add_argument("--freeze-after", type=int, default=0, help="oracle: stop refitting after this many steps (0: never)")
p.add_argument("--ntest", type=int, default=1000)
p.add_argument("--options", default="{}")
p.add_argument("--ceiling", action="store_true", help="also print the held-out cosine of the running least-squares fit")
a = p.parse_args()
torch.set_num_threads(int(os.environ.get("THREADS", "2")))

b = load_dataset("cifar10", os.environ["BIO_EXT_CIFAR10_ROOT"], val_fraction=0.0, seed=a.seed, limit=a.n)
xs, ys, xt, yt = as_tensors(b, a.ntest)
model = narrow_vgg("vgg16", a.width, a.seed)
plain = copy.deepcopy(model)
if a.feedback != "bp":
    model = bio_ext.convert(model, a.mode, seed=a.seed, conv_feedback=a.conv_feedback, input_shape=(3, 32, 32),
                            radial=a.radial, options=json.loads(a.options))
    layers = dict(feedback_layers(model))
else:
    layers = {}
opt = torch.optim.Adam(model.parameters(), lr=a.lr)

# the true gradient at each converted layer's input, from the plain network with the converted one's parameters
captured = {}


def _capture(name):
    def hook(mod, args):
        x = args[0]
        if x.requires_grad:
            captured[name] = x
    return hook


for name, mod in plain.named_modules():
    if name in layers:
        mod.register_forward_pre_hook(_capture(name))
S_ee = None  # the running fit's sums (--feedback oracle), created at the first error
S_eg = {}
cos_sum, cos_n = {}, 0
ceil_sum = {}


def true_gradients(x, y):
    captured.clear()
    params = dict(model.named_parameters())
    out = torch.func.functional_call(plain, params, (x,))
    names = list(captured)
    grads = torch.autograd.grad(F.cross_entropy(out, y), [out] + [captured[n] for n in names])
    return grads[0].detach(), dict(zip(names, (g.detach() for g in grads[1:])))


def least_squares(s_ee, s_eg):
    """``B* = (S_ee + ridge I)^-1 S_eg`` of the running sums, the ridge scaled to ``S_ee``'s mean diagonal."""
    d = s_ee.shape[0]
    return torch.linalg.solve(s_ee + a.ridge * s_ee.diagonal().mean() * torch.eye(d), s_eg)


def batch_cos(p, g):
    """The cosine between two ``N x K`` tensors flattened over the whole batch."""
    return float((p * g).sum() / (p.norm() * g.norm()).clamp_min(1e-30))


g_gen = torch.Generator().manual_seed(a.seed)
step = 0
print("ARGS", vars(a), flush=True)
for ep in range(a.epochs):
    model.train()
    plain.train()
    perm = torch.randperm(len(xs), generator=g_gen)
    tot = cnt = 0.0
    for i in range(0, len(xs), a.bs):
        idx = perm[i:i + a.bs]
        x, y = xs[idx], ys[idx]
        if layers:
            e, grads = true_gradients(x, y)
            n, d = e.shape
            fitting = a.feedback == "oracle" and not (a.freeze_after and step >= a.freeze_after)
            flat = {}
            for name, g in grads.items():
                fb = layers[name].feedback
                if g.dim() == 4 and fb.dim() == 4 and fb.shape[-2:] != g.shape[-2:]:  # dense: the padded grid
                    ph, pw = (fb.shape[-2] - g.shape[-2]) // 2, (fb.shape[-1] - g.shape[-1]) // 2
                    g = F.pad(g, (pw, pw, ph, ph))
                flat[name] = g2 = g.reshape(n, -1)
                if fb.numel() == d * g2.shape[1]:  # held-out cosine of the current feedback with the truth
                    cos_sum[name] = cos_sum.get(name, 0.0) + batch_cos(e @ fb.reshape(d, -1), g2)
            if a.ceiling and S_ee is not None:  # the fit of the batches before this one, held out
                for name, s in S_eg.items():
                    ceil_sum[name] = ceil_sum.get(name, 0.0) + batch_cos(e @ least_squares(S_ee, s), flat[name])
            cos_n += 1
            if fitting or a.ceiling:
                for name, g2 in flat.items():
                    S_eg[name] = a.beta * S_eg.get(name, torch.zeros(d, g2.shape[1])) + e.T @ g2
                S_ee = a.beta * (torch.zeros(d, d) if S_ee is None else S_ee) + e.T @ e
            if fitting:
                with torch.no_grad():
                    for name, s in S_eg.items():
                        fb = layers[name].feedback
                        if fb.numel() == s.numel():
                            bstar = least_squares(S_ee, s)
                            fb.copy_((bstar * (fb.norm() / bstar.norm().clamp_min(1e-30))).reshape(fb.shape))
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tot += float(loss.detach()) * len(idx)
        cnt += len(idx)
    model.eval()
    with torch.no_grad():
        acc = sum(int((model(xt[j:j + 250]).argmax(1) == yt[j:j + 250]).sum()) for j in range(0, a.ntest, 250))
    print(f"EPOCH {ep + 1} step {step} train_loss {tot / cnt:.3f} test_acc {100 * acc / a.ntest:.1f}", flush=True)
    if cos_n:
        cosines = {k: round(v / cos_n, 3) for k, v in cos_sum.items()}
        print("  cos(eB, true g) per layer", json.dumps(cosines), flush=True)
        if ceil_sum:
            print("  cos(eB*, true g) per layer (least-squares fit, held out)",
                  json.dumps({k: round(v / cos_n, 3) for k, v in ceil_sum.items()}), flush=True)
        cos_sum, cos_n, ceil_sum = {}, 0, {}
