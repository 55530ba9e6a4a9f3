"""GRU cells of DIEN (the DIEN paper, §4): the interest extractor's GRU (Eq. 2–5) and the interest
evolving variants with attention (AIGRU Eq. 9, AGRU Eq. 10, AUGRU Eq. 11–13).

Gate convention follows torch.nn.GRU, so that its weights load unchanged: z = σ(W_z x + U_z h),
r = σ(W_r x + U_r h), h̃ = tanh(W_h x + r ∘ (U_h h)) (biases included), and the paper's update
gate is u = 1 − z:

    GRU:    h' = (1 − u) ∘ h + u ∘ h̃
    AUGRU:  ũ = a · u,  h' = (1 − ũ) ∘ h + ũ ∘ h̃      (attention scales every dimension of u)
    AGRU:   h' = (1 − a) · h + a · h̃                   (attention replaces u)
    AIGRU:  the GRU on the input a · x

Shape legend: B batch, T steps, I input size, H hidden size; a is one scalar per row and step.

`sequence` is what the models run: the input projection of every step in one matmul, then the
time loop in C++ (csrc/attgru.cpp; the CPU) or in Triton (trainer.models.gru_triton; CUDA),
each with a hand-written backward, one autograd node for the whole sequence. `run_sequence` is
the plain Python step loop through the cell: the reference the tests hold `sequence` to.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from embedding import cpp
from trainer.models import gru_triton

KINDS = ("gru", "aigru", "agru", "augru")
_MODE = {"gru": 0, "aigru": 0, "agru": 1, "augru": 2}  # the C++ kernel's modes; AIGRU = GRU on a·x


class AttentionGRUCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.x2h = nn.Linear(input_size, 3 * hidden_size)  # rows: r, z, h̃ (torch.nn.GRU order)
        self.h2h = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor | None = None, kind: str = "gru"
    ) -> torch.Tensor:
        # x [B, I], h [B, H], att [B] -> h' [B, H]
        if kind == "aigru":
            x = att.unsqueeze(1) * x
        xr, xz, xn = self.x2h(x).chunk(3, 1)
        hr, hz, hn = self.h2h(h).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(-(xz + hz))  # = 1 − z
        cand = torch.tanh(xn + r * hn)
        if kind == "augru":
            u = att.unsqueeze(1) * u
        elif kind == "agru":
            u = att.unsqueeze(1).expand_as(u)
        return h + u * (cand - h)

    def load_torch_gru(self, gru: nn.GRU) -> None:
        """Copy the weights of a one-layer torch.nn.GRU (batch_first or not)."""
        self.x2h.weight.data.copy_(gru.weight_ih_l0)
        self.x2h.bias.data.copy_(gru.bias_ih_l0)
        self.h2h.weight.data.copy_(gru.weight_hh_l0)
        self.h2h.bias.data.copy_(gru.bias_hh_l0)


def run_sequence(
    cell: AttentionGRUCell, x: torch.Tensor, lengths: torch.Tensor, att: torch.Tensor | None = None, kind: str = "gru"
) -> tuple[torch.Tensor, torch.Tensor]:
    """States of every step [B, T, H] and the state after each row's last real step [B, H].

    Steps at or beyond a row's length leave its state unchanged (padding has no effect);
    their entries in the first output are zeros.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown GRU kind {kind!r} (one of {', '.join(KINDS)})")
    b, t, _ = x.shape
    h = x.new_zeros(b, cell.hidden_size)
    states = []
    for step in range(t):
        a = att[:, step] if att is not None else None
        new = cell(x[:, step], h, a, kind)
        real = (step < lengths).unsqueeze(1)
        h = torch.where(real, new, h)
        states.append(torch.where(real, new, torch.zeros_like(new)))
    return torch.stack(states, 1) if states else x.new_zeros(b, 0, cell.hidden_size), h


@functools.cache
def kernel():
    """The C++ sequence kernel (built on first use, cached; `make setup` builds it ahead)."""
    # -fopenmp: each step's rows run on torch's threads; -march=native: exp and tanh vectorize
    flags = ("-ffast-math", "-fopenmp", "-march=native")
    return cpp.load(Path(__file__).with_name("csrc") / "attgru.cpp", "dinrec_attgru", flags)


class _Sequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, w_hh, b_hh, att, lengths, mode, fused):
        states, last, *saved = kernel().forward(xg, w_hh, b_hh, att, lengths, mode, fused)
        ctx.mode, ctx.fused = mode, fused
        ctx.save_for_backward(w_hh, att, *saved)
        return states, last

    @staticmethod
    def backward(ctx, grad_states, grad_last):
        w_hh, att, *saved = ctx.saved_tensors
        dxg, dw, db, datt = kernel().backward(grad_states, grad_last, w_hh, att, ctx.mode, *saved, ctx.fused)
        return dxg, dw, db, datt if ctx.needs_input_grad[3] else None, None, None, None


@torch.compiler.disable  # model.compile: the sequence kernels (C++, Triton) run as they are, between graphs
def sequence(
    cell: AttentionGRUCell,
    x: torch.Tensor,
    lengths: torch.Tensor,
    att: torch.Tensor | None = None,
    kind: str = "gru",
    fused: bool = True,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_sequence`'s result (states [B, T, H], zero at padding; last real state [B, H]) in one
    autograd node for the whole sequence, by `kernel`: "cpp", the C++ kernel (on the CPU each
    step's elementwise work is one fused pass; `fused=False`: the ATen composition, kept testable
    here), "triton", the Triton kernel (trainer.models.gru_triton: the whole time loop in one
    launch each way; float32), or "auto": Triton for float32 on CUDA, C++ otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown GRU kind {kind!r} (one of {', '.join(KINDS)})")
    if kind != "gru" and att is None:
        raise ValueError(f"{kind} needs attention scores")
    if kind == "aigru":
        x = att.unsqueeze(2) * x
    # every step's input gates in one matmul (in bf16 under autocast); the recurrence in x's dtype
    xg = cell.x2h(x).to(x.dtype)
    a = att if kind in ("agru", "augru") else x.new_empty(0)
    if kernel == "triton" or (kernel == "auto" and x.is_cuda and x.dtype == torch.float32):
        return gru_triton.sequence(xg, cell.h2h.weight, cell.h2h.bias, a, lengths, kind)
    return _Sequence.apply(xg, cell.h2h.weight, cell.h2h.bias, a, lengths.to(torch.int64), _MODE[kind], fused)


if __name__ == "__main__":  # `python -m trainer.models.gru`: build the C++ kernel ahead of the first run
    kernel()
    print("trainer.models.gru: C++ sequence kernel built")
