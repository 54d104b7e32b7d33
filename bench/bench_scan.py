"""Selective-scan throughput: forward + backward tokens/s of the chunked scan against the
token-by-token reference, and of one mamba_tiny block against one ViT block of the same width.

    python bench/bench_scan.py [--batch 32] [--tokens 64] [--repeats 5] [--threads N] [--record]

The scan runs at mamba_tiny's shape (d_inner 192, d_state 8) on `--tokens` tokens; the blocks
(pre-norm mixer + MLP ratio 4 at width 96, against timm's ViT Block at width 96, 3 heads, MLP
ratio 4) on the 64 tokens of a 32 px image at patch 4. Each variant's median of `--repeats`.
"""

from __future__ import annotations

import shlex
import sys

from common import apply_threads, bench_parser, median_seconds, record

import torch
from timm.models.vision_transformer import Block

from models import create_model  # noqa: E402  (common puts the repository root on sys.path)
from models.selective_scan import selective_scan, selective_scan_ref  # noqa: E402


def scan_inputs(b: int, L: int, d: int = 192, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    ins = [r(b, d, L), r(b, d, L), -torch.arange(1.0, n + 1).repeat(d, 1), r(b, n, L), r(b, n, L), r(d), r(b, d, L)]
    return [t.requires_grad_() for t in ins]


def fwd_bwd(fn, ins, **kw):
    def step():
        y = fn(*ins, delta_softplus=True, **kw)
        y.sum().backward()

    return step


def block_step(block: torch.nn.Module, x: torch.Tensor):
    def step():
        block(x).sum().backward()

    return step


def main(argv=None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--tokens", type=int, default=64, help="sequence length of the scan (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    torch.manual_seed(0)
    b, L = args.batch, args.tokens
    ins = scan_inputs(b, L)
    rows = [("scan: sequential reference", fwd_bwd(selective_scan_ref, ins))]
    rows += [(f"scan: chunked, chunk {c}", fwd_bwd(selective_scan, ins, chunk=c)) for c in (8, 16, 32)]
    rows += [("scan: chunked 16 + checkpoint", fwd_bwd(selective_scan, ins, chunk=16, checkpoint=True))]
    mamba_block = create_model("mamba_tiny", 10, 32, depth=1, drop_path_rate=0.0).blocks[0]
    vit_block = Block(96, 3, mlp_ratio=4.0)
    x = torch.randn(b, 64, 96, requires_grad=True)
    count = lambda m: sum(q.numel() for q in m.parameters())
    rows += [(f"block: mamba_tiny (width 96, {count(mamba_block) / 1e3:.0f}k params)", block_step(mamba_block, x))]
    rows += [(f"block: ViT (width 96, 3 heads, {count(vit_block) / 1e3:.0f}k params)", block_step(vit_block, x))]
    lines = ["| variant | median fwd+bwd s | tokens/s |", "|---|---|---|"]
    for name, step in rows:
        sec = median_seconds(step, warmup=1, repeats=args.repeats)
        tokens = b * (L if name.startswith("scan") else 64)
        lines.append(f"| {name} | {sec:.4f} | {tokens / sec:,.0f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Batch {b}; scan at d_inner 192, d_state 8, {L} tokens; blocks on 64 tokens (32 px, patch 4)."]
    if args.record:
        cmd = "python bench/bench_scan.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        record("Selective scan and Mamba block throughput", cmd, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
