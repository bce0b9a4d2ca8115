"""One distillation training step of a causal LM: kdbench's loss against eager and compiled PyTorch.

    python -m kdbench.bench.lm_step [--device cuda] [--vocab 32000 128256] [--out FILE.md]

For each vocabulary V, a Llama student (``--student``, default ``llama_128x2``) takes one
optimiser step on a batch of ``--batch`` sequences of ``--seq-len`` tokens, distilling a
teacher's logits (forward KL, T = 2, alpha = 0.5: the KD and hard-label terms).  The teacher's
logits are computed once, outside the timed step, so the loss and the student are what is
timed.  Providers of the loss, on the same model, data and optimiser:

* ``kdbench``: :class:`kdbench.KDLoss` (the fused Triton kernels on CUDA, the chunked
  reference on CPU);
* ``eager``: the four lines of PyTorch a trainer would write: ``log_softmax`` of both,
  ``kl_div(..., log_target=True)``, ``cross_entropy``;
* ``compile``: ``torch.compile`` of those four lines (CUDA only unless ``--compile-cpu``).

Reported per provider: median step time over ``--repeats`` steps after ``--warmup``,
tokens per second (scored positions: batch x (L - 1)), and peak device memory of the step
above what was allocated before it (CUDA; on CPU, "–").  Prints a Markdown table and writes
it to ``--out``.  Each provider's loss at the first step is checked against ``eager``'s
(relative 1e-3), so a fast wrong loss is flagged, not ranked.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

TEMPERATURE, ALPHA = 2.0, 0.5


def eager_kd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Forward KL at T with the hard term, the way a trainer writes it: ``(B, L, V)`` logits, ``(B, L)`` labels."""
    v = s.shape[-1]
    log_s = F.log_softmax(s.reshape(-1, v).float() / TEMPERATURE, -1)
    log_t = F.log_softmax(t.reshape(-1, v).float() / TEMPERATURE, -1)
    kd = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * TEMPERATURE**2
    return ALPHA * F.cross_entropy(s.reshape(-1, v).float(), y.reshape(-1)) + (1 - ALPHA) * kd


def providers(device: torch.device, compile_cpu: bool) -> dict[str, Callable[..., torch.Tensor]]:
    import kdbench

    out: dict[str, Callable[..., torch.Tensor]] = {  # eager first: the others' losses are checked against it
        "eager": eager_kd,
        "kdbench": kdbench.KDLoss(temperature=TEMPERATURE, alpha=ALPHA),
    }
    if device.type == "cuda" or compile_cpu:
        out["compile"] = torch.compile(eager_kd)
    return out


def time_step(model, loss_fn, tokens, teacher_logits, *, warmup: int, repeats: int, device: torch.device
              ) -> tuple[float, float, float | None]:
    """(first loss, median seconds per step, peak extra bytes or None on CPU)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits
        loss = loss_fn(logits[:, :-1], teacher_logits[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        return float(loss.detach())

    first = step()
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return first, statistics.median(times), peak


def run(args: argparse.Namespace) -> str:
    from kdbench.experiments.models import build_model

    device = torch.device(args.device)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [
        f"# One KD training step of a causal LM on {what}",
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with `python -m kdbench.bench.lm_step "
        f"{' '.join(sys.argv[1:]) if args.argv is None else ' '.join(args.argv)}` (torch {torch.__version__}); "
        f"student {args.student}, batch {args.batch} x {args.seq_len} tokens, forward KL T = {TEMPERATURE:g}, "
        f"alpha = {ALPHA:g}; median of {args.repeats} steps after {args.warmup} warm-up steps; peak: device memory "
        "of the step above what was allocated before it.",
        "",
        "| V | provider | step ms | tokens/s | peak MiB | loss at step 1 | matches eager |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for vocab in args.vocab:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen).to(device)
        teacher_logits = (torch.randn(args.batch, args.seq_len, vocab, generator=gen) * 2).to(device)
        ref = None
        for name, fn in providers(device, args.compile_cpu).items():
            torch.manual_seed(0)
            model = build_model(args.student, (args.seq_len,), vocab).hf.to(device)
            try:
                first, sec, peak = time_step(model, fn, tokens, teacher_logits, warmup=args.warmup,
                                             repeats=args.repeats, device=device)
            except Exception as e:  # one provider's failure is a cell of the table, not the end of the run
                lines.append(f"| {vocab} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} "
                             "| | | | |")
                continue
            if name == "eager":
                ref = first
            ok = "–" if ref is None else ("yes" if abs(first - ref) <= 1e-3 * abs(ref) else "NO")
            scored = args.batch * (args.seq_len - 1)
            mib = "–" if peak is None else f"{peak / 2**20:.0f}"
            lines.append(f"| {vocab} | {name} | {sec * 1e3:.2f} | {scored / sec:,.0f} | {mib} | {first:.5f} | {ok} |")
            del model
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdbench.bench.lm_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--student", default="llama_128x2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile-cpu", action="store_true", help="also time torch.compile on CPU")
    p.add_argument("--out", type=Path, help="Markdown file to write")
    args = p.parse_args(argv)
    args.argv = argv
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("kdbench.bench.lm_step: --device cuda needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    for name in ("batch", "seq_len", "repeats"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            print(f"kdbench.bench.lm_step: --{name.replace('_', '-')}: expected a positive int", file=sys.stderr)
            return 2
    if any(v < 2 for v in args.vocab):
        print("kdbench.bench.lm_step: --vocab: expected sizes >= 2", file=sys.stderr)
        return 2
    table = run(args)
    print(table)
    if args.out is not None:
        from kdbench._io import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
