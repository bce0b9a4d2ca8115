"""How the chunks of a wide row should meet: separate launches, the in-kernel barrier or the lagged launch, per tile configuration.

    python -m kdbench.bench.kd_modes [--out FILE.md]

On a CUDA GPU, times ``kd_loss`` forward+backward and forward only (no gradient),
forward KL, T = 2, at (8192, 128256) bf16 on the Triton backend, for
every ``ROW_MEETING`` in ``ROW_MEETINGS`` and every entry of ``TILE_CONFIGS``, with
``triton.testing.do_bench`` (20 ms warm-up, 100 ms of repeats; its mean), then reverse
KL and JSD in each way of meeting at the default tile.  Prints a Markdown table and writes it to
``--out``.  Exits 2 with one line on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

from kdbench.bench.report import emit_markdown

SHAPE = (8192, 128256)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdbench.bench.kd_modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="Markdown file to write")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kdbench.bench.kd_modes: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    import kdbench
    from kdbench.kernels import kd_loss as kernel

    s = torch.randn(*SHAPE, device="cuda").bfloat16()
    t = torch.randn_like(s)

    def fwd_bwd(divergence: str) -> None:
        x = s.detach().requires_grad_(True)
        kdbench.kd_loss(x, t, temperature=2.0, divergence=divergence, backend="triton").backward()

    def fwd_only() -> None:
        with torch.no_grad():
            kdbench.kd_loss(s, t, temperature=2.0, backend="triton")

    lines = [
        f"# kd_loss on {torch.cuda.get_device_name(0)}: how the chunks of a row meet",
        "",
        f"Measured {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC with `python -m kdbench.bench.kd_modes` "
        f"(torch {torch.__version__}, triton {triton.__version__}); forward KL, T = 2, {SHAPE} bf16, "
        "`triton.testing.do_bench` means.",
        "",
        "| ROW_MEETING | tile | warps | CTAs/SM | forward+backward ms | forward only ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    old = (kernel.ROW_MEETING, kernel.TILE_CONFIG)
    try:
        for meeting in kernel.ROW_MEETINGS:
            kernel.ROW_MEETING = meeting
            for cfg in kernel.TILE_CONFIGS:
                kernel.TILE_CONFIG = cfg
                fwd_bwd("forward")
                a = triton.testing.do_bench(lambda: fwd_bwd("forward"), warmup=20, rep=100)
                b = triton.testing.do_bench(fwd_only, warmup=20, rep=100)
                lines.append(f"| {meeting} | {cfg[0]} | {cfg[1]} | {cfg[2]} | {a:.3f} | {b:.3f} |")
                print(lines[-1], flush=True)
        kernel.TILE_CONFIG = old[1]
        lines += ["", f"Forward+backward at the default tile {old[1]}:", ""]
        for meeting in kernel.ROW_MEETINGS:
            kernel.ROW_MEETING = meeting
            for divergence in ("reverse", "jsd"):
                fwd_bwd(divergence)
                ms = triton.testing.do_bench(lambda: fwd_bwd(divergence), warmup=10, rep=50)
                lines.append(f"- {meeting}, {divergence}: {ms:.3f} ms")
                print(lines[-1], flush=True)
    finally:
        kernel.ROW_MEETING, kernel.TILE_CONFIG = old
    return emit_markdown(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
