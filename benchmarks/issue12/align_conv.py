import sys, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..")); import bio_ext
torch.set_num_threads(1)
shape, steps, batch, ch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]); S = int(__import__("os").environ.get("S", 16))
opts = eval(sys.argv[5]) if len(sys.argv) > 5 else {}
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.Tanh(), nn.Conv2d(ch, ch, 3, padding=1, stride=2), nn.Tanh(),
                      nn.Flatten(), nn.Linear(ch * S * S // 4, 10))
torch.manual_seed(1)
teacher = nn.Sequential(nn.Flatten(), nn.Linear(S * S, 10))
def make():
    x = torch.randn(batch, 1, S, S)
    with torch.no_grad():
        return x, teacher(x).argmax(1)
conv = bio_ext.convert(model, "grape", seed=0, conv_feedback=shape, input_shape=(1, S, S), options=opts)
opt = torch.optim.SGD(conv.parameters(), lr=0.0)
for s in range(steps + 1):
    x, y = make()
    if s % 50 == 0:
        al = bio_ext.alignment(conv, x, y)
        print(s, {k: round(v.cosine, 3) for k, v in al.items() if v.cosine is not None}, "est", {k: round(v.estimate, 1) for k, v in al.items() if v.estimate is not None}, flush=True)
    opt.zero_grad(); F.cross_entropy(conv(x), y).backward(); opt.step()
