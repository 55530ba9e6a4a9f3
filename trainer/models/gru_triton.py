"""DIEN's GRU time loop as one Triton kernel each way (CUDA; on the CPU under TRITON_INTERPRET=1,
which is how CI checks it): the contract is trainer.models.gru.run_sequence.

Forward: one program per block of rows runs all T steps, the hidden state and the three [H, H]
blocks of U (W_hh) staying in registers; per step it reads the step's input gates (x·W_ihᵀ + b,
one matmul for the whole sequence before the kernel), multiplies h by U with `tl.dot` in IEEE
fp32, applies the gates and the attention (GRU, AGRU, AUGRU; AIGRU is the GRU on a·x) and writes
the state, zero at padding. It also writes the gates r, u, h̃ and U_h·h + b of every step for the
backward.

Backward: the same programs run the steps in reverse with the saved gates, carrying dL/dh; they
write dL/d(input gates) and dL/d(U·h + b) of every step and dL/da; dL/dU and dL/db are then one
matmul and one sum over all rows and steps (no atomics, so the result does not depend on the
schedule).

Shapes: B rows, T steps, H hidden (≤ 128 here: U's blocks live in registers), BLOCK_H the power of
two ≥ max(16, H) that `tl.dot` needs.
"""

from __future__ import annotations

import os

import torch

from embedding.mba_compile import build

try:  # Triton is optional on the CPU (tests run the kernels under TRITON_INTERPRET=1).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

BLOCK_B = 16  # rows per program (tl.dot needs at least 16)
MAX_HIDDEN = 128

if triton is not None:

    @triton.jit
    def _u_block(w_ptr, g: tl.constexpr, H, BLOCK_H: tl.constexpr, TRANSPOSED: tl.constexpr):
        """Gate g's block of U = W_hh [3H, H], [BLOCK_H, BLOCK_H], zero outside H: Uᵀ (k, j) =
        U[gH + j, k] for h·Uᵀ in the forward, else U (j, k) for dgh·U in the backward."""
        a = tl.arange(0, BLOCK_H)
        if TRANSPOSED:
            ptr = w_ptr + (g * H + a[None, :]) * H + a[:, None]
        else:
            ptr = w_ptr + (g * H + a[:, None]) * H + a[None, :]
        return tl.load(ptr, mask=(a[:, None] < H) & (a[None, :] < H), other=0.0)

    @triton.jit
    def _program_rows(len_ptr, B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's rows and columns, their masks, and the rows' lengths."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_H)
        rmask = rows < B
        cmask = cols < H
        m2 = rmask[:, None] & cmask[None, :]
        return rows, cols, rmask, cmask, m2, tl.load(len_ptr + rows, mask=rmask, other=0)

    @triton.jit
    def _u_blocks(w_ptr, H, BLOCK_H: tl.constexpr, TRANSPOSED: tl.constexpr):
        """U's three gate blocks r, z, h̃ (see `_u_block`)."""
        ur = _u_block(w_ptr, 0, H, BLOCK_H, TRANSPOSED)
        uz = _u_block(w_ptr, 1, H, BLOCK_H, TRANSPOSED)
        un = _u_block(w_ptr, 2, H, BLOCK_H, TRANSPOSED)
        return ur, uz, un

    @triton.jit
    def _update_gate(u, att_ptr, rows, rmask, T, t, MODE: tl.constexpr):
        """(the update gate as applied, ũ; the attention a of step t, [BLOCK_B, 1]): GRU ũ = u,
        AGRU ũ = a, AUGRU ũ = a·u (GRU: a is not read; u stands in for it)."""
        if MODE == 0:
            uu = u
            a = u
        elif MODE == 1:
            a = tl.load(att_ptr + rows * T + t, mask=rmask, other=0.0)[:, None]
            uu = a + tl.zeros_like(u)
        else:
            a = tl.load(att_ptr + rows * T + t, mask=rmask, other=0.0)[:, None]
            uu = a * u
        return uu, a

    @triton.jit
    def _forward_kernel(
        xg_ptr,  # [B, T, 3H] input gates
        w_ptr,  # [3H, H]
        b_ptr,  # [3H]
        att_ptr,  # [B, T] (MODE > 0)
        len_ptr,  # [B] int64
        states_ptr,  # [B, T, H] out
        last_ptr,  # [B, H] out
        saved_ptr,  # [B, T, 4H] out: r, u, h̃, U_h·h + b_h
        B,
        T,
        H,
        MODE: tl.constexpr,  # 0 GRU, 1 AGRU, 2 AUGRU
        BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        rows, cols, rmask, cmask, m2, lengths = _program_rows(len_ptr, B, H, BLOCK_B, BLOCK_H)
        ur, uz, un = _u_blocks(w_ptr, H, BLOCK_H, True)
        br = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        bz = tl.load(b_ptr + H + cols, mask=cmask, other=0.0)
        bn = tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0)
        h = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        for t in range(T):
            base = (rows[:, None] * T + t) * (3 * H) + cols[None, :]
            xr = tl.load(xg_ptr + base, mask=m2, other=0.0)
            xz = tl.load(xg_ptr + base + H, mask=m2, other=0.0)
            xn = tl.load(xg_ptr + base + 2 * H, mask=m2, other=0.0)
            hr = tl.dot(h, ur, input_precision="ieee") + br[None, :]
            hz = tl.dot(h, uz, input_precision="ieee") + bz[None, :]
            hn = tl.dot(h, un, input_precision="ieee") + bn[None, :]
            r = tl.sigmoid(xr + hr)
            u = tl.sigmoid(-(xz + hz))  # the paper's update gate, 1 − z
            pre = xn + r * hn
            c = 2.0 * tl.sigmoid(2.0 * pre) - 1.0  # tanh
            uu, a = _update_gate(u, att_ptr, rows, rmask, T, t, MODE)
            new = h + uu * (c - h)
            real = (t < lengths)[:, None]
            h = tl.where(real, new, h)
            tl.store(states_ptr + (rows[:, None] * T + t) * H + cols[None, :], tl.where(real, new, 0.0), mask=m2)
            s = (rows[:, None] * T + t) * (4 * H) + cols[None, :]
            tl.store(saved_ptr + s, r, mask=m2)
            tl.store(saved_ptr + s + H, u, mask=m2)
            tl.store(saved_ptr + s + 2 * H, c, mask=m2)
            tl.store(saved_ptr + s + 3 * H, hn, mask=m2)
        tl.store(last_ptr + rows[:, None] * H + cols[None, :], h, mask=m2)

    @triton.jit
    def _backward_kernel(
        gs_ptr,  # [B, T, H] dL/d states
        gl_ptr,  # [B, H] dL/d last
        w_ptr,  # [3H, H]
        att_ptr,  # [B, T]
        len_ptr,  # [B]
        states_ptr,  # [B, T, H]
        saved_ptr,  # [B, T, 4H]
        dxg_ptr,  # [B, T, 3H] out: dL/d input gates
        dgh_ptr,  # [B, T, 3H] out: dL/d (U·h + b)
        datt_ptr,  # [B, T] out (MODE > 0)
        B,
        T,
        H,
        MODE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        rows, cols, rmask, cmask, m2, lengths = _program_rows(len_ptr, B, H, BLOCK_B, BLOCK_H)
        ur, uz, un = _u_blocks(w_ptr, H, BLOCK_H, False)
        dh = tl.load(gl_ptr + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
        for i in range(T):
            t = T - 1 - i
            real = (t < lengths)[:, None]
            at = (rows[:, None] * T + t) * H + cols[None, :]
            dh += tl.where(real, tl.load(gs_ptr + at, mask=m2, other=0.0), 0.0)
            s = (rows[:, None] * T + t) * (4 * H) + cols[None, :]
            r = tl.load(saved_ptr + s, mask=m2, other=0.0)
            u = tl.load(saved_ptr + s + H, mask=m2, other=0.0)
            c = tl.load(saved_ptr + s + 2 * H, mask=m2, other=0.0)
            hn = tl.load(saved_ptr + s + 3 * H, mask=m2, other=0.0)
            has_prev = (tl.zeros_like(lengths) + t) > 0
            prev = tl.load(states_ptr + at - H, mask=m2 & has_prev[:, None], other=0.0)  # h_{t−1}; 0 at t = 0
            uu, a = _update_gate(u, att_ptr, rows, rmask, T, t, MODE)
            d_uu = dh * (c - prev)
            d_pre_n = dh * uu * (1.0 - c * c)
            d_hn = d_pre_n * r
            d_pre_r = d_pre_n * hn * r * (1.0 - r)
            if MODE == 0:
                d_pre_z = -d_uu * u * (1.0 - u)
            elif MODE == 1:
                d_pre_z = tl.zeros_like(u)
                tl.store(datt_ptr + rows * T + t, tl.where(t < lengths, tl.sum(d_uu, axis=1), 0.0), mask=rmask)
            else:
                d_pre_z = -d_uu * a * u * (1.0 - u)
                tl.store(datt_ptr + rows * T + t, tl.where(t < lengths, tl.sum(d_uu * u, axis=1), 0.0), mask=rmask)
            d_pre_r = tl.where(real, d_pre_r, 0.0)
            d_pre_z = tl.where(real, d_pre_z, 0.0)
            d_pre_n = tl.where(real, d_pre_n, 0.0)
            d_hn = tl.where(real, d_hn, 0.0)
            g = (rows[:, None] * T + t) * (3 * H) + cols[None, :]
            tl.store(dxg_ptr + g, d_pre_r, mask=m2)
            tl.store(dxg_ptr + g + H, d_pre_z, mask=m2)
            tl.store(dxg_ptr + g + 2 * H, d_pre_n, mask=m2)
            tl.store(dgh_ptr + g, d_pre_r, mask=m2)
            tl.store(dgh_ptr + g + H, d_pre_z, mask=m2)
            tl.store(dgh_ptr + g + 2 * H, d_hn, mask=m2)
            through = tl.dot(d_pre_r, ur, input_precision="ieee")
            through += tl.dot(d_pre_z, uz, input_precision="ieee")
            through += tl.dot(d_hn, un, input_precision="ieee")
            dh = tl.where(real, dh * (1.0 - uu) + through, dh)


_MODES = {"gru": 0, "aigru": 0, "agru": 1, "augru": 2}


def available(device: torch.device) -> bool:
    """Triton runs on CUDA, and on the CPU only in its interpreter (TRITON_INTERPRET=1 set before
    triton is imported)."""
    return triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def warps(block_h: int) -> int:
    """Warps per program: U's three blocks fit in registers without spilling at sm_90 with 4
    warps up to H = 32, 8 at 64, 16 at 128 (`python -m trainer.models.gru_triton 90`)."""
    return {16: 4, 32: 4, 64: 8}.get(block_h, 16)


def _block_h(h: int) -> int:
    if h > MAX_HIDDEN:
        raise ValueError(f"gru kernel triton: hidden size {h} above {MAX_HIDDEN} (U's blocks live in registers)")
    return max(16, triton.next_power_of_2(h))


class _Sequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, b_hh, att, lengths, mode):
        b, t, h3 = xg.shape
        h = h3 // 3
        xg, w_hh, b_hh, att = xg.contiguous(), w_hh.contiguous(), b_hh.contiguous(), att.contiguous()
        states = xg.new_empty(b, t, h)
        last = xg.new_empty(b, h)
        saved = xg.new_empty(b, t, 4 * h)
        grid, bh = (triton.cdiv(b, BLOCK_B),), _block_h(h)
        _forward_kernel[grid](
            xg, w_hh, b_hh, att, lengths, states, last, saved, b, t, h, mode, BLOCK_B, bh, num_warps=warps(bh)
        )
        ctx.mode = mode
        ctx.save_for_backward(w_hh, att, lengths, states, saved)
        return states, last

    @staticmethod
    def backward(ctx, grad_states, grad_last):
        w_hh, att, lengths, states, saved = ctx.saved_tensors
        b, t, h = states.shape
        grad_states = grad_states.contiguous() if grad_states is not None else torch.zeros_like(states)
        grad_last = grad_last.contiguous() if grad_last is not None else states.new_zeros(b, h)
        dxg = states.new_empty(b, t, 3 * h)
        dgh = states.new_empty(b, t, 3 * h)
        datt = states.new_zeros(b, t) if ctx.mode else states.new_empty(0)
        grid, bh = (triton.cdiv(b, BLOCK_B),), _block_h(h)
        _backward_kernel[grid](
            grad_states,
            grad_last,
            w_hh,
            att,
            lengths,
            states,
            saved,
            dxg,
            dgh,
            datt,
            b,
            t,
            h,
            ctx.mode,
            BLOCK_B,
            bh,
            num_warps=warps(bh),
        )
        prev = torch.cat([states.new_zeros(b, 1, h), states[:, :-1]], dim=1)  # h_{t−1} of every real step
        dw = dgh.reshape(-1, 3 * h).t() @ prev.reshape(-1, h)
        db = dgh.sum((0, 1))
        return dxg, dw, db, datt if ctx.needs_input_grad[3] else None, None, None


def sequence(
    xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, att: torch.Tensor, lengths: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """States [B, T, H] (zero at padding) and the last real state [B, H] from the input gates xg
    [B, T, 3H] (AIGRU: of a·x), U = w_hh [3H, H], b_hh [3H], att [B, T] (AGRU, AUGRU; else
    empty) and lengths [B] int64."""
    if not available(xg.device):
        raise ValueError("gru kernel triton: needs a CUDA device, or TRITON_INTERPRET=1 with triton installed")
    if xg.dtype != torch.float32:
        raise ValueError(f"gru kernel triton: float32 inputs only, got {xg.dtype}")
    return _Sequence.apply(xg, w_hh, b_hh, att, lengths.to(torch.int64).contiguous(), _MODES[kind])


def compile_kernels(arch: int = 90) -> list[str]:
    """Compile both kernels (GRU, AGRU, AUGRU; BLOCK_H = 32, 64 and 128) for CUDA sm_<arch> without a GPU,
    as embedding.mba_compile does for MBA's; one line per kernel with ptxas's register report.
    Run without TRITON_INTERPRET."""
    f32, i64 = "*fp32", "*i64"
    done = []
    for block_h in (32, 64, 128):
        for mode in (0, 1, 2):
            consts = dict(MODE=mode, BLOCK_B=BLOCK_B, BLOCK_H=block_h)
            sizes = dict(B="i32", T="i32", H="i32")
            fwd = dict(xg_ptr=f32, w_ptr=f32, b_ptr=f32, att_ptr=f32, len_ptr=i64)
            fwd.update(states_ptr=f32, last_ptr=f32, saved_ptr=f32, **sizes)
            done.append(build(_forward_kernel, fwd, consts, arch, warps(block_h)))
            bwd = dict(gs_ptr=f32, gl_ptr=f32, w_ptr=f32, att_ptr=f32, len_ptr=i64, states_ptr=f32)
            bwd.update(saved_ptr=f32, dxg_ptr=f32, dgh_ptr=f32, datt_ptr=f32, **sizes)
            done.append(build(_backward_kernel, bwd, consts, arch, warps(block_h)))
    return done


if __name__ == "__main__":  # python -m trainer.models.gru_triton 90: the sm_90 compile check
    import sys

    print("\n".join(compile_kernels(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))
