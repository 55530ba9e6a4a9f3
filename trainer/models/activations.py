"""The DIN paper's activations, PReLU (Eq. 8) and Dice (Eq. 9), each with its function and
backward as custom ops: C++ on the CPU (csrc/activations.cpp: parallel over blocks of rows, one
pass each way for PReLU, two for Dice), ATen ops on other devices (and with `use_kernel=False`).

PReLU: y = s > 0 ? s : α·s, ∂L/∂s = g·(s > 0 ? 1 : α), ∂L/∂α = Σ g·s·[s ≤ 0] (torch's
convention at 0). Dice, with c = s − μ, r = sqrt(max(σ², ε²)), d = r + ε, p = σ(c / d),
y = s·(α + (1 − α)·p) and the incoming gradient g (μ and σ² the batch's mean and biased
variance, functions of the whole column):

    q     = g·s·(1 − α)·p·(1 − p)                                   (∂L/∂(c/d))
    ∂L/∂s = g·(α + (1 − α)·p) + (q − mean(q) − c·mean(q·c)·[σ² ≥ ε²] / (d·r)) / d
    ∂L/∂α = Σ g·s·(1 − p)

Both keep the input's dtype (bf16 under autocast, where the next matmul would round to bf16
anyway) and compute in the parameters' (fp32). Eager, ATen's PReLU backward and the autograd
graph of Dice's plain expression were several times slower than these kernels at DIN's shapes;
compiled from the plain expressions, Inductor ran the column reductions with one thread per
group of columns, fused with the padding of the matmul rows (docs/results.md, "CPU speed").
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from embedding import cpp


@functools.cache
def kernel():
    """The C++ kernels (built on first use, cached; `make setup` builds them ahead)."""
    # -march=native: the exp and the bfloat16 conversions vectorize (AVX-512 where the CPU has it);
    # -fopenmp: at::parallel_for runs on torch's threads (without it the loops run on one)
    flags = ("-ffast-math", "-fopenmp", "-march=native")
    return cpp.load(Path(__file__).with_name("csrc") / "activations.cpp", "dinrec_activations", flags)


@torch.library.custom_op("dinrec::prelu", mutates_args=())
def prelu(s: torch.Tensor, alpha: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
    """s [N, H], α [H] -> [N, H] in s's dtype."""
    if s.device.type == "cpu" and use_kernel:
        return kernel().prelu_forward(s.contiguous(), alpha.contiguous())
    t = s.to(alpha.dtype)
    return torch.where(t > 0, t, alpha * t).to(s.dtype)


@torch.library.custom_op("dinrec::prelu_backward", mutates_args=())
def prelu_backward(
    g: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor, use_kernel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    g = g.to(s.dtype)
    if s.device.type == "cpu" and use_kernel:
        return tuple(kernel().prelu_backward(g.contiguous(), s.contiguous(), alpha.contiguous()))
    t, g = s.to(alpha.dtype), g.to(alpha.dtype)
    pos = t > 0
    return torch.where(pos, g, alpha * g).to(s.dtype), torch.where(pos, 0, g * t).sum(0)


@prelu.register_fake
def _(s, alpha, use_kernel=True):
    return torch.empty_like(s)


@prelu_backward.register_fake
def _(g, s, alpha, use_kernel=True):
    return torch.empty_like(s), torch.empty_like(alpha)


def _prelu_setup(ctx, inputs, output) -> None:
    s, alpha, ctx.use_kernel = inputs
    ctx.save_for_backward(s, alpha)


def _prelu_grad(ctx, g):
    s, alpha = ctx.saved_tensors
    return *prelu_backward(g, s, alpha, ctx.use_kernel), None


prelu.register_autograd(_prelu_grad, setup_context=_prelu_setup)


class PReLU(nn.Module):
    """PReLU with one α per channel over [N, H] rows (the parameter is `weight`, as torch.nn.PReLU's)."""

    def __init__(self, dim: int, init: float = 0.25, use_kernel: bool = True):
        super().__init__()
        self.use_kernel = use_kernel
        self.weight = nn.Parameter(torch.full((dim,), init))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return prelu(s, self.weight, self.use_kernel)


def _aten_forward(s: torch.Tensor, alpha: torch.Tensor, eps: float):
    t = s.to(alpha.dtype)
    mean, var = t.mean(0), t.var(0, unbiased=False)
    root = var.clamp_min(eps * eps).sqrt()
    p = torch.sigmoid((t - mean) / (root + eps))
    return (t * (alpha + (1 - alpha) * p)).to(s.dtype), mean, var, root


def _aten_backward(g, s, alpha, mean, var, root, eps: float):
    t, d, g = s.to(alpha.dtype), root + eps, g.to(alpha.dtype)
    c = t - mean
    p = torch.sigmoid(c / d)
    gs = g * t
    q = gs * (1 - alpha) * p * (1 - p)
    through = (q * c).mean(0) * (var >= eps * eps).to(t.dtype) / (d * root)
    ds = g * (alpha + (1 - alpha) * p) + (q - q.mean(0) - c * through) / d
    return ds.to(s.dtype), (gs * (1 - p)).sum(0)


@torch.library.custom_op("dinrec::dice_train", mutates_args=())
def dice_train(
    s: torch.Tensor, alpha: torch.Tensor, eps: float, use_kernel: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """s [N, H] (N ≥ 1), α [H] -> y [N, H] in s's dtype (computed in α's), and the batch's mean,
    biased variance and r [H] (no gradient flows back through those three). `use_kernel=False`:
    the ATen ops on the CPU too (the other devices' path, kept testable here)."""
    if s.device.type == "cpu" and use_kernel:
        return tuple(kernel().dice_forward(s.contiguous(), alpha.contiguous(), eps))
    return _aten_forward(s, alpha, eps)


@torch.library.custom_op("dinrec::dice_train_backward", mutates_args=())
def dice_train_backward(
    g: torch.Tensor,
    s: torch.Tensor,
    alpha: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    root: torch.Tensor,
    eps: float,
    use_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = g.to(s.dtype)
    if s.device.type == "cpu" and use_kernel:
        return tuple(kernel().dice_backward(g.contiguous(), s.contiguous(), alpha, mean, var, root, eps))
    return _aten_backward(g, s, alpha, mean, var, root, eps)


@dice_train.register_fake
def _(s, alpha, eps, use_kernel=True):
    h = alpha.new_empty(s.shape[1])
    return torch.empty_like(s), h, torch.empty_like(h), torch.empty_like(h)


@dice_train_backward.register_fake
def _(g, s, alpha, mean, var, root, eps, use_kernel=True):
    return torch.empty_like(s), torch.empty_like(alpha)


def _dice_setup(ctx, inputs, output) -> None:
    s, alpha, eps, use_kernel = inputs
    _, mean, var, root = output
    ctx.save_for_backward(s, alpha, mean, var, root)
    ctx.eps, ctx.use_kernel = eps, use_kernel
    ctx.mark_non_differentiable(mean, var, root)


def _dice_grad(ctx, g, _mean, _var, _root):
    s, alpha, mean, var, root = ctx.saved_tensors
    ds, dalpha = dice_train_backward(g, s, alpha, mean, var, root, ctx.eps, ctx.use_kernel)
    return ds, dalpha, None, None


dice_train.register_autograd(_dice_grad, setup_context=_dice_setup)


class Dice(nn.Module):
    """Data-adaptive activation, paper Eq. 9, per channel:

        f(s) = p(s)·s + (1 − p(s))·α·s,   p(s) = sigmoid((s − E[s]) / (sqrt(Var[s]) + ε))

    Training uses the mini-batch mean and (biased) variance (`dice_train`); evaluation uses their
    moving averages. Variance is floored at ε² before the square root: the value changes by at
    most ε in the denominator, and a constant channel (e.g. a batch of one row) gives a zero
    gradient instead of 0·∞ = NaN. In training the output has the input's dtype (bf16 under
    autocast, where the next matmul would round it to bf16 anyway), computed in the parameters'
    dtype; an empty batch passes through and leaves the moving averages as they are.
    """

    def __init__(self, dim: int, eps: float = 1e-8, momentum: float = 0.01, use_kernel: bool = True):
        super().__init__()
        self.eps, self.momentum, self.use_kernel = eps, momentum, use_kernel
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, s: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, H]
        if not self.training:
            p = torch.sigmoid((s - self.running_mean) / (self.running_var.clamp_min(self.eps**2).sqrt() + self.eps))
            return s * (p + (1 - p) * self.alpha)
        n = s.shape[0]
        if n == 0:
            return s
        out, mean, var, _ = dice_train(s, self.alpha, self.eps, self.use_kernel)
        with torch.no_grad():
            unbiased = var * (n / (n - 1)) if n > 1 else var
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(unbiased, self.momentum)
        return out


def activation(name: str, dim: int) -> nn.Module:
    if name == "dice":
        return Dice(dim)
    if name == "prelu":
        return PReLU(dim, init=0.25)  # Eq. 8, one α per channel
    raise ValueError(f"unknown activation {name!r}")
