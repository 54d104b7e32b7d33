"""The selective scan of Mamba, in pure PyTorch: a chunked parallel scan and its sequential reference.

For every channel d and state n (A[d, n] < 0):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,        y_t = C_t . h_t + D u_t     (h_0 = 0)

`selective_scan` splits the L tokens into chunks of `chunk` tokens. Inside a chunk the log
decays dt*A are summed in log space (S_t = cumulative sum, <= 0) and the states come from two
cumulative sums, h_t = exp(S_t) (h_0 + sum_{s<=t} exp(-S_s) dt_s B_s u_s), with no loop over tokens;
a chunk whose decay spans more than LOG_SPAN (where exp(-S) could overflow: large dt) is split in
two halves, recursively, so any dt is exact. Across chunks a short loop carries the last state.
Memory is bounded by the chunk: with `checkpoint=True` each chunk's intermediates are recomputed
in the backward pass instead of stored. The scan runs in fp32 (fp64 for fp64 inputs) whatever
the input dtype, as the fused kernel does, and returns the input dtype.

`selective_scan_ref` is the readable token-by-token loop the fast path is tested against.
Argument layout follows mamba_ssm's `selective_scan_fn`: u, delta, z (batch, d, L); A (d, n);
B, C (batch, n, L); D, delta_bias (d). When the `mamba_ssm` package is installed and the tensors
are on CUDA, `selective_scan` may call its fused kernel (`fused=True`); it is never required.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

try:  # optional fused CUDA kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _fused_scan
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _fused_scan = None


def fused_available() -> bool:
    return _fused_scan is not None and torch.cuda.is_available()


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """fp32 (fp64 for fp64 inputs) tensors in the scan's layout: u, delta (b, L, d); B, C (b, L, n)."""
    f = _acc(u)
    delta = delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(f).transpose(1, 2), delta.transpose(1, 2), A.to(f), B.to(f).transpose(1, 2), C.to(f).transpose(1, 2)


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _finish(y, u, D, z, dtype):
    """y (b, L, d) -> + D u, gated by silu(z), as (b, d, L) in `dtype`."""
    y = y.transpose(1, 2)
    if D is not None:
        y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Sequential reference: one step per token (fp32). Returns (batch, d, L)."""
    dtype = u.dtype
    uu, dt, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    h = uu.new_zeros(uu.shape[0], uu.shape[2], A.shape[1])
    ys = []
    for t in range(uu.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * uu[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return _finish(torch.stack(ys, 1), u, D, z, dtype)


LOG_SPAN = 60.0  # a chunk whose log decay spans more is split: exp(60) ~ 1e26 stays far from fp32's 3e38


def _states(log_a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """States h_t (b, T, d, n) of one chunk from log decays and inputs (b, T, d, n) and h0 (b, d, n)."""
    if log_a.shape[1] == 1:
        return torch.exp(log_a) * h0[:, None] + x
    S = torch.cumsum(log_a, 1)  # <= 0, decreasing along the chunk
    if float(S[:, -1].detach().min()) < -LOG_SPAN:  # exp(-S) could overflow: two halves, carried
        half = log_a.shape[1] // 2
        first = _states(log_a[:, :half], x[:, :half], h0)
        return torch.cat([first, _states(log_a[:, half:], x[:, half:], first[:, -1])], 1)
    return torch.exp(S) * (torch.cumsum(torch.exp(-S) * x, 1) + h0[:, None])


def _scan_chunk(dt, u, A, B, C, h0):
    """One chunk. dt, u: (b, T, d); A: (d, n); B, C: (b, T, n); h0: (b, d, n).
    Returns (y (b, T, d), the last state)."""
    h = _states(dt[..., None] * A, (dt * u)[..., None] * B[:, :, None, :], h0)
    return torch.einsum("btdn,btn->btd", h, C), h[:, -1]


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    chunk: int = 16,
    checkpoint: bool = False,
    fused: bool = True,
):
    """Chunked parallel selective scan (see the module docstring). Returns (batch, d, L)."""
    if fused and u.is_cuda and _fused_scan is not None:
        return _fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    with torch.autocast(u.device.type, enabled=False):
        uu, dt, A32, B32, C32 = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        h = uu.new_zeros(uu.shape[0], uu.shape[2], A32.shape[1])
        ys = []
        for s in range(0, uu.shape[1], chunk):
            part = slice(s, s + chunk)
            args = (dt[:, part], uu[:, part], A32, B32[:, part], C32[:, part], h)
            y, h = _checkpoint(_scan_chunk, *args, use_reentrant=False) if checkpoint else _scan_chunk(*args)
            ys.append(y)
        return _finish(torch.cat(ys, 1), u, D, z, dtype)
