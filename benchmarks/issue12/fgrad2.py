"""As fgrad.py, but only the measured layer's input is perturbed (the other layers carry no tangent)."""
import sys, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from bio_ext.session import FeedbackSession
_orig = FeedbackSession.perturb
def perturb(self, slot, x):
    return _orig(self, slot, x) if slot == 0 else x
FeedbackSession.perturb = perturb
sys.argv = ["fgrad.py"]
src = open(__import__("os").path.join(__import__("os").path.dirname(__file__), "fgrad.py")).read().replace("grid = [", "grid = [(256, d, 64, 1) for d in (2, 4, 8)] + [(1024, 2, 64, 1)]\n_unused = [")
exec(compile(src, "fgrad.py", "exec"))
