"""Character-level GPT-2 on tiny-shakespeare: BP vs DFA vs GrAPE, macro and micro feedback.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/char_lm.py --threads 1 \
        --runs backprop,dfa:macro,dfa:micro,grape:macro,grape:micro,dfa:layer,grape:layer

The GrAPE seed's Table 3 setting in miniature (WikiText-103 there): a GPT-2-style decoder
built from ``transformers.GPT2Config`` (4 layers, width 128, 4 heads, context 128, the 65
characters of the corpus as vocabulary, no dropout, ``attn_implementation="sdpa"``), trained
on the first 90 % of tiny-shakespeare and evaluated on the last 10 %.

Every run: the same initial weights (``--seed``), the same sequence of random training windows
(batch ``--batch`` x 128 tokens), AdamW (lr ``--lr``, weight decay 0.01, linear warmup over the
first 5 % of steps, then cosine decay to 10 %), ``--steps`` steps. The error of the direct modes
is taken at the input of ``lm_head`` (bio_ext's default for vocabulary heads: ``error_at="auto"``),
so the feedback matrices are ``128 x 128`` whatever the vocabulary. A run is
``mode[:granularity][:key=value...]``: ``macro`` injects feedback at every block output, ``micro``
also at every attention and MLP sub-layer output (backprop inside them); ``key=value`` pairs are
mode options (``grape:layer:directions=2``). Validation perplexity is ``exp`` of the mean next-character
cross-entropy over ``--eval-windows`` fixed validation windows.

Then (unless ``--no-timing``) one training step of every run is timed against plain backprop in
the same process (interleaved rounds, median). Results are appended to ``--out`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bio_ext  # noqa: E402
from _common import hardware, interleaved_medians  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CONTEXT = 128


def load_text(root: Path) -> str:
    path = root / "tinyshakespeare" / "input.txt" if root.is_dir() else root
    if not path.is_file():
        raise SystemExit(f"tiny-shakespeare not found at {path}: expected DATA/tinyshakespeare/input.txt "
                         "(one text file); pass --data DATA (the folder holding tinyshakespeare/) or the file.")
    return path.read_text(encoding="utf-8")


def encode(text: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], chars


def make_model(vocab: int, seed: int, layers: int = 4, width: int = 128, heads: int = 4,
               attn: str = "sdpa") -> torch.nn.Module:
    import transformers
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=CONTEXT, n_embd=width, n_layer=layers, n_head=heads,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation=attn)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def parse_run(run: str) -> Tuple[str, str, Dict]:
    """``mode[:granularity][:key=value...]`` -> ``(mode, granularity, mode options)``."""
    mode, *rest = run.split(":")
    gran = rest.pop(0) if rest and "=" not in rest[0] else "layer"
    opts = {}
    for pair in rest:
        key, _, value = pair.partition("=")
        opts[key] = yaml.safe_load(value)
    return mode, gran, opts


def build(run: str, plain: torch.nn.Module, seed: int, options: Dict) -> torch.nn.Module:
    mode, gran, own = parse_run(run)
    if mode == "backprop":  # plain torch, no conversion
        return plain
    opts = {**(options if mode == "grape" else {}), **own}
    return bio_ext.convert(plain, mode, granularity=gran, seed=seed, options=opts)


def windows(data: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(CONTEXT + 1)
    return data[starts[:, None] + offsets]  # (B, CONTEXT + 1): inputs and shifted targets


def lm_loss(model, chunk: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=chunk[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, val: torch.Tensor, n_windows: int, batch: int = 64) -> float:
    model.eval()
    starts = torch.linspace(0, len(val) - CONTEXT - 2, n_windows).long()
    total, count = 0.0, 0
    for i in range(0, n_windows, batch):
        chunk = windows(val, starts[i:i + batch]).to(next(model.parameters()).device)
        total += lm_loss(model, chunk).item() * len(chunk)
        count += len(chunk)
    model.train()
    return math.exp(total / count)


def point_alignment(model, chunk: torch.Tensor) -> List[float]:
    """Per macro/micro feedback point: cosine (over the whole batch) between the injected ``e @ B_k`` and the
    true gradient at the point's output, ``e`` being the error at the LM head's input. Runs on a copy."""
    points = bio_ext.feedback_points(model) if bio_ext.is_converted(model) else []
    if not points:
        return []
    plain = bio_ext.revert(model)  # a plain copy
    outs, head = {}, {}
    hooks = [plain.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: outs.__setitem__(n, o if isinstance(o, torch.Tensor) else o[0])) for n, _ in points]
    hooks.append(plain.lm_head.register_forward_pre_hook(lambda m, a: head.__setitem__("x", a[0])))
    loss = lm_loss(plain, chunk)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [outs[n] for n, _ in points] + [head["x"]])
    e = grads[-1].reshape(-1, grads[-1].shape[-1])
    return [F.cosine_similarity((e @ p.feedback.reshape(p.feedback.shape[0], -1)).reshape(-1), g.reshape(-1),
                                dim=0).item() for (_, p), g in zip(points, grads[:-1])]


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(run: str, train_ids: torch.Tensor, val_ids: torch.Tensor, vocab: int, args, options: Dict,
          progress=None) -> Dict:
    model = build(run, make_model(vocab, args.seed, attn=args.attn), args.seed, options).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed + 1)  # same windows for every run
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        chunk = windows(train_ids, torch.randint(0, len(train_ids) - CONTEXT - 1, (args.batch,), generator=g))
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, chunk.to(args.device))
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(run, step, loss.item())
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, val_ids, args.eval_windows)
    tail = losses[-max(1, args.steps // 20):]
    # GrAPE: mini-batch cosine between each point's projected error and its forward-gradient estimate, last step
    sites = [m for _, m in bio_ext.feedback_layers(model)] + [p for _, p in bio_ext.feedback_points(model)] \
        if bio_ext.is_converted(model) else []
    cos = [float(m.grape_cos) for m in sites if hasattr(m, "grape_cos")]
    align = point_alignment(model, windows(val_ids, torch.arange(16) * 997).to(args.device))
    return {"run": run, "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "options": options if run.startswith("grape") else {}, "val_ppl": ppl,
            "train_loss_end": sum(tail) / len(tail), "seconds": seconds, "grape_cos_last": cos,
            "point_alignment": align}


def step_times(runs: List[str], train_ids: torch.Tensor, vocab: int, args, options: Dict) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    chunk = windows(train_ids, torch.randint(0, len(train_ids) - CONTEXT - 1, (args.batch,), generator=g))
    chunk = chunk.to(args.device)
    steps = {}
    for run in dict.fromkeys(["backprop"] + runs):
        model = build(run, make_model(vocab, args.seed, attn=args.attn), args.seed, options).to(args.device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            lm_loss(model, chunk).backward()
            opt.step()

        steps[run] = step
    return interleaved_medians(steps, rounds=args.rounds, per_round=2, warmup=2, device=torch.device(args.device))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="folder holding tinyshakespeare/input.txt (default: ../shared/data from the repo root)")
    p.add_argument("--runs", default="backprop,dfa:macro,dfa:micro,grape:macro,grape:micro",
                   help="comma-separated mode[:granularity][:key=value...] (granularity layer, macro or micro; "
                        "mode options); backprop: the plain model")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--feedback-lr", type=float, help="GrAPE feedback_lr (default: bio_ext's)")
    p.add_argument("--halflife", type=float, help="GrAPE feedback_lr_halflife in steps (default: bio_ext's)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (2 steps each)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", default="runs/char_lm.jsonl")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_ids, val_ids, chars = encode(load_text(Path(args.data)))
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if parse_run(r)[1] not in ("layer", "macro", "micro")]
    if bad:
        raise SystemExit(f"--runs: unknown granularity in {bad}; write mode[:layer|macro|micro]")
    options = {k: v for k, v in (("feedback_lr", args.feedback_lr), ("feedback_lr_halflife", args.halflife))
               if v is not None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"tiny-shakespeare: {len(train_ids)} train / {len(val_ids)} val characters, vocab {len(chars)}; "
          f"GPT-2 4x128, 4 heads, context {CONTEXT}, {args.attn}; {hardware()}", flush=True)
    rows = []
    if not args.no_train:
        from bio_ext.benchmark.progress import cli_progress  # a bar in a terminal, a line every 30 s in a log
        bar = cli_progress(sys.stderr)(total=len(runs) * args.steps, desc="char_lm", unit="step")

        def progress(run, step, loss):
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(run=run, loss=f"{loss:.3f}")

        for run in runs:
            row = train(run, train_ids, val_ids, len(chars), args, options, progress)
            row["date"] = time.strftime("%Y-%m-%d")
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            align = row["point_alignment"]
            print(f"{run}: val ppl {row['val_ppl']:.3f}, train loss (last 5%) {row['train_loss_end']:.3f}, "
                  f"{row['seconds']:.0f} s" + (f", mean cos(e B_k, true gradient) at the points "
                                             f"{sum(align) / len(align):.3f}" if align else ""), flush=True)
        bar.close()
        print(f"\n{args.steps} steps, batch {args.batch}x{CONTEXT}, AdamW lr {args.lr}, seed {args.seed}\n")
        print("| run | val perplexity | train loss (last 5 %) | s |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['run']} | {r['val_ppl']:.2f} | {r['train_loss_end']:.3f} | {r['seconds']:.0f} |")
    if not args.no_timing:
        times = step_times(runs, train_ids, len(chars), args, options)
        base = times["backprop"]
        print(f"\nstep time, batch {args.batch}x{CONTEXT}, {torch.get_num_threads()} thread(s), median of "
              f"{args.rounds} rounds x 2 steps\n")
        print("| run | ms/step | ratio to backprop |\n|---|---:|---:|")
        for run, t in times.items():
            print(f"| {run} | {t * 1000:.1f} | {t / base:.3f} |")
        with open(args.out, "a") as f:
            f.write(json.dumps({"timing": {k: v for k, v in times.items()}, "batch": args.batch,
                                "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}) + "\n")


if __name__ == "__main__":
    main()
