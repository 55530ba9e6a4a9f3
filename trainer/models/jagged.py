"""The two row operations of the jagged behaviour batches, as custom ops with their own backward:

    gather_rows(table [R, H], rows [N]) -> [N, H]        table[rows]: a batch row's vector to each behaviour
    segment_sum(values [N, H], rows [N], R) -> [R, H]    Σ of the values of each batch row

`rows` is nondecreasing, as `embedding.layout.jagged_rows` makes it (segment_sum checks this on
the CPU). Each op is the other's backward. As ops of their own they reach torch.compile as calls
of eager kernels, around which Inductor fuses the elementwise work; written as plain tensor code,
Inductor generated its own scatter for index_add_ (and for index_select's backward), which on
the CPU ran several times slower than the eager kernel (docs/results.md, "CPU speed").

The gather is index_select. The sum is, on the CPU, our kernel (csrc/jagged.cpp: parallel over
output rows, each row's values added in order, bfloat16 summed in float and rounded once), and
index_add_ elsewhere: the kernel gives index_add_'s float result bit for bit, at a third of its
time at DIN's shapes on 2 cores, where index_add_ ran on one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from embedding import cpp

SOURCE = Path(__file__).with_name("csrc") / "jagged.cpp"
FLAGS = ("-fopenmp", "-march=native")  # -fopenmp: at::parallel_for runs on torch's threads


@functools.cache
def kernel():
    """The C++ segment sum (built on first use, cached; `make setup` builds it ahead)."""
    return cpp.load(SOURCE, "dinrec_jagged", FLAGS)


@torch.library.custom_op("dinrec::gather_rows", mutates_args=())
def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return table.index_select(0, rows)


@torch.library.custom_op("dinrec::segment_sum", mutates_args=())
def segment_sum(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    if values.device.type == "cpu":
        return kernel().segment_sum(values.contiguous(), rows.contiguous(), n_rows)
    return values.new_zeros(n_rows, values.shape[1]).index_add_(0, rows, values)


@gather_rows.register_fake
def _(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return table.new_empty(rows.shape[0], table.shape[1])


@segment_sum.register_fake
def _(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    return values.new_empty(n_rows, values.shape[1])


def _save_rows(ctx, inputs, output) -> None:
    ctx.rows, ctx.n_rows = inputs[1], inputs[0].shape[0]


def _gather_backward(ctx, grad: torch.Tensor):
    return segment_sum(grad, ctx.rows, ctx.n_rows), None


def _segment_sum_backward(ctx, grad: torch.Tensor):
    return gather_rows(grad, ctx.rows), None, None


gather_rows.register_autograd(_gather_backward, setup_context=_save_rows)
segment_sum.register_autograd(_segment_sum_backward, setup_context=_save_rows)
