"""DIN's local activation unit with PReLU as one fused op, forward and backward (C++ on the CPU,
csrc/attention.cpp). trainer.models.layers.LocalActivationUnit defines the function; this op
computes the same one:

    z1_i = [h_i, h_i ⊙ c_s]·W1ᵀ + P_s      (P_s = c_s·(W_v − W_d)ᵀ + b1, the candidate's part)
    a_k = prelu(z_k, α_k),  z_{k+1} = a_k·W_{k+1}ᵀ + b_{k+1}
    w_i = a_L·u + b_u,      out_s = Σ_{i in row s} w_i·h_i

Unfused, every layer's [N, H] output is written and read again by each elementwise pass (the
gather of P, the add, PReLU, and their backwards). The kernel takes blocks of whole histories
(about 256 behaviours) through every layer while they are in cache and writes only z_k, which
its backward reads to recompute the activations. Layer 1 takes the candidate into its weights
per batch row, [h, h ⊙ c]·W1ᵀ = h·M_s with M_s = W_aᵀ + diag(c_s)·W_bᵀ (W1 = [W_a, W_b]): half
its multiply-adds. Same parameters, same function: the tests check it against the unfused unit
and float64 autograd.

`bf16`: the products' operands in bfloat16 (accumulated in float) and z_k stored in bfloat16, as
autocast runs the unfused unit; everything else in float. On a CPU with AVX512-BF16 every product
runs on our own loops of its pair instruction (vdpbf16ps: two bfloat16 products added to a float
per lane, twice a float FMA's work), layer 1 folded as in float; LocalActivationUnit's `auto`
fuses under bf16 autocast there only (`bf16_pairs`). Without them the bf16 op runs its block
products on MKL's bf16 GEMM (on the AMD EPYC of docs/results.md, before the pair products: a
slower DIN step than the layers under autocast).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.nn import functional as F

from embedding import cpp

SOURCE = Path(__file__).with_name("csrc") / "attention.cpp"
FLAGS = ("-fopenmp", "-march=native")  # -fopenmp: at::parallel_for runs on torch's threads


@functools.cache
def kernel():
    """The C++ kernel (built on first use, cached; `make setup` builds it ahead)."""
    return cpp.load(SOURCE, "dinrec_attention", FLAGS)


@functools.cache
@torch.compiler.assume_constant_result
def bf16_pairs() -> bool:
    """Whether the kernel runs bfloat16 products as AVX512-BF16 pair products (it is built for
    the CPU it runs on: -march=native). A constant to torch.compile: traced, it reached the
    kernel's loader (file reads) and broke the tower's graph in two."""
    return kernel().pairs()


@torch.library.custom_op("dinrec::din_attention", mutates_args=())
def din_attention(
    hist: torch.Tensor,
    cand: torch.Tensor,
    p: torch.Tensor,
    offsets: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    alphas: list[torch.Tensor],
    u: torch.Tensor,
    bu: torch.Tensor,
    bf16: bool,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """hist [N, D], cand [B, D], p [B, H1], offsets [B + 1], weights W_k [H_k, in_k] (W1 over
    [h, h ⊙ c]), biases b_k (k ≥ 2), alphas α_k [H_k], u [H_L], bu [1] -> out [B, D], the
    behaviours' weights w [N] and the z_k [N, H_k] for the backward (with `save`, else [0, H_k])."""
    out = kernel().forward(
        hist.contiguous(),
        cand.contiguous(),
        p.contiguous(),
        offsets.contiguous(),
        [w.contiguous() for w in weights],
        [b.contiguous() for b in biases],
        [a.contiguous() for a in alphas],
        u.contiguous(),
        bu.contiguous(),
        save,
        bf16,
    )
    return out[0], out[1], list(out[2:])


@din_attention.register_fake
def _(hist, cand, p, offsets, weights, biases, alphas, u, bu, bf16, save):
    n, dtype = hist.shape[0], torch.bfloat16 if bf16 else hist.dtype
    return (
        cand.new_empty(cand.shape),
        hist.new_empty(n),
        [hist.new_empty(n if save else 0, w.shape[0], dtype=dtype) for w in weights],
    )


@torch.library.custom_op("dinrec::din_attention_backward", mutates_args=())
def din_attention_backward(
    gout: torch.Tensor,
    hist: torch.Tensor,
    cand: torch.Tensor,
    offsets: torch.Tensor,
    weights: list[torch.Tensor],
    alphas: list[torch.Tensor],
    u: torch.Tensor,
    wgt: torch.Tensor,
    zs: list[torch.Tensor],
    bf16: bool,
) -> list[torch.Tensor]:
    """-> [∂hist, ∂cand, ∂p, ∂W_1..L, ∂b_2..L, ∂α_1..L, ∂u, ∂bu]"""
    return list(
        kernel().backward(
            gout.contiguous(),
            hist.contiguous(),
            cand.contiguous(),
            offsets.contiguous(),
            [w.contiguous() for w in weights],
            [a.contiguous() for a in alphas],
            u.contiguous(),
            wgt,
            list(zs),
            bf16,
        )
    )


@din_attention_backward.register_fake
def _(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, bf16):
    grads = [torch.empty_like(hist), torch.empty_like(cand), cand.new_empty(cand.shape[0], weights[0].shape[0])]
    grads += [torch.empty_like(w) for w in weights] + [weights[0].new_empty(w.shape[0]) for w in weights[1:]]
    return grads + [torch.empty_like(a) for a in alphas] + [torch.empty_like(u), u.new_empty(1)]


def _setup(ctx, inputs, output) -> None:
    hist, cand, _p, offsets, weights, _biases, alphas, u, _bu, bf16, _save = inputs
    _, wgt, zs = output
    ctx.n_layers, ctx.bf16 = len(weights), bf16
    ctx.save_for_backward(hist, cand, offsets, u, wgt, *weights, *alphas, *zs)
    ctx.mark_non_differentiable(wgt, *zs)
    ctx.set_materialize_grads(False)  # else autograd writes zero gradients of w and the z_k, [N, H_k], every step


def _grad(ctx, gout, _gw, _gz):
    hist, cand, offsets, u, wgt, *rest = ctx.saved_tensors
    if gout is None:  # the output was not used
        gout = torch.zeros_like(cand)
    n = ctx.n_layers
    weights, alphas, zs = rest[:n], rest[n : 2 * n], rest[2 * n :]
    g = din_attention_backward(gout, hist, cand, offsets, weights, alphas, u, wgt, zs, ctx.bf16)
    dh, dc, dp, rest = g[0], g[1], g[2], g[3:]
    dw, db, da, du, dbu = rest[:n], rest[n : 2 * n - 1], rest[2 * n - 1 : 3 * n - 1], rest[-2], rest[-1]
    return dh, dc, dp, None, list(dw), list(db), list(da), du, dbu, None, None


din_attention.register_autograd(_grad, setup_context=_setup)


def fused_unit(unit, hist: torch.Tensor, cand: torch.Tensor, lengths: torch.Tensor, bf16: bool) -> torch.Tensor:
    """LocalActivationUnit `unit` (PReLU layers) on hist [N, D], cand [B, D], lengths [B] -> [B, D]
    through the fused op, with the unit's own parameters."""
    layers = list(unit.mlp)
    linears, acts = layers[0:-1:2], layers[1:-1:2]
    first, last = layers[0], layers[-1]
    w_e, w_v, w_diff, w_prod = first.weight.split(unit.dim, dim=1)
    p = F.linear(cand, w_v - w_diff, first.bias).to(hist.dtype)  # [B, H1] (bf16 under autocast)
    w1 = torch.cat([w_e + w_diff, w_prod], dim=1)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    out, _, _ = din_attention(
        hist,
        cand,
        p,
        offsets,
        [w1] + [m.weight for m in linears[1:]],
        [m.bias for m in linears[1:]],
        [a.weight for a in acts],
        last.weight.view(-1),
        last.bias,
        bf16,
        torch.is_grad_enabled(),  # the z_k are kept for a backward only
    )
    return out
