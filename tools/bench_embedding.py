"""`dinrec bench embedding`: the cost of MBA in the embedding step (forward + backward + update).

On one workload (a table of --rows rows, --batch samples × --ids ids drawn from a Zipf law, sum
pooling, upstream gradient fixed), per embedding dim, the median step time of:

  a  FBGEMM's table-batched embedding with its fused EXACT_SGD (what torchrec's FUSED kernel runs),
     no regularization;
  b  the same module under our MBA optimizer (embedding.mba_tbe: lookup + fused MBA row update;
     Triton on CUDA, the C++ kernel on the CPU), λ > 0, static counts;
  c  torch nn.EmbeddingBag(sparse=True) + SGD with the L2 term of Eq. 7 on the touched rows, in
     PyTorch ops (coalesce the sparse gradient, gather, update, scatter).

and the ratios b/a (the price of MBA; goal ≤ 1.1 on GPU, ≤ 1.5 on CPU) and c/b (> 1: ours beats the
plain PyTorch way). All three run in the same process on the same ids. On the GPU such a step is
bound by the host, so what one step of a and of b asks of the host is counted too: ATen operators
dispatched and Triton kernels launched.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from trainer.config import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embedding", help="MBA embedding step vs FBGEMM fused SGD vs torch sparse SGD")
    p.add_argument("--rows", type=int, default=2**20, help="table rows (default: %(default)s)")
    p.add_argument("--dims", default="16,64,128", help="embedding dims, comma-separated (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4096, help="samples per step (default: %(default)s)")
    p.add_argument("--ids", type=int, default=50, help="ids per sample (default: %(default)s)")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the ids (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--lam", type=float, default=0.01, help="MBA λ for b and c (default: %(default)s)")
    p.add_argument(
        "--kernels",
        default="auto",
        help="MBA kernels to time for b, comma-separated from auto,cpp,triton; the first gives "
        "the ratios (default: %(default)s = Triton on CUDA, C++ on the CPU)",
    )
    p.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's table of 10 MBA steps (first dim) to stderr"
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="(default: cuda when available)",
    )


def zipf_ids(rng: np.random.Generator, rows: int, n: int, s: float) -> np.ndarray:
    """n ids with P(rank k) ∝ 1/k^s over `rows` ranks, the ranks scattered over the table."""
    p = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** s
    cdf = np.cumsum(p / p.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), rows - 1)
    return rng.permutation(rows)[ranks]


def _fbgemm_tbe(rows: int, dim: int, device: torch.device, lr: float):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device.type == "cuda"
    spec = (
        rows,
        dim,
        EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
        ComputeDevice.CUDA if cuda else ComputeDevice.CPU,
    )
    return SplitTableBatchedEmbeddingBagsCodegen(
        [spec], optimizer=EmbOptimType.EXACT_SGD, learning_rate=lr, pooling_mode=PoolingMode.SUM, device=device
    )


def _timed(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds per step."""
    times = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(*b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _ops_per_step(step, batch) -> dict[str, int]:
    """What one step asks of the host: ATen operators dispatched, and Triton kernels launched (the
    operators that Triton's CPU interpreter runs inside a launch are not counted)."""
    from contextlib import ExitStack
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"aten": 0, "triton": 0}
    inside = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["aten"] += inside[0] == 0
            return func(*args, **(kwargs or {}))

    def counted(run):
        def wrapper(self, *args, **kwargs):
            counts["triton"] += inside[0] == 0
            inside[0] += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                inside[0] -= 1

        return wrapper

    with ExitStack() as stack:
        try:
            from triton.runtime import interpreter, jit

            for cls in (jit.JITFunction, interpreter.InterpretedFunction):
                stack.enter_context(mock.patch.object(cls, "run", counted(cls.run)))
        except ImportError:  # no Triton: nothing to launch
            pass
        stack.enter_context(Count())
        step(*batch)
    return counts


def _profile(step, batches, device: torch.device) -> None:
    """torch.profiler's per-operator table of 10 steps, to stderr (where a step's time goes)."""
    import sys

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(10):
            step(*batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)


def bench_embedding(
    rows: int,
    dims: list[int],
    batch: int,
    ids: int,
    zipf: float,
    steps: int,
    warmup: int,
    lam: float,
    device: torch.device,
    kernels: tuple[str, ...] = ("auto",),
    profile: bool = False,
) -> dict:
    from embedding.mba_tbe import MBAParams, MBATableBatchedEmbedding

    rng = np.random.default_rng(0)
    lr = 0.01
    n_batches = 4
    offsets = torch.arange(0, (batch + 1) * ids, ids, device=device)
    data = [torch.tensor(zipf_ids(rng, rows, batch * ids, zipf), device=device) for _ in range(n_batches)]
    counts = torch.tensor(np.maximum(rng.poisson(20.0, rows), 1), dtype=torch.int32, device=device)
    unique = [int(torch.unique(d).numel()) for d in data]
    results = []
    for dim in dims:
        grads = [torch.randn(batch, dim, device=device) for _ in range(n_batches)]
        batches = [(d, g) for d, g in zip(data, grads, strict=True)]

        a = _fbgemm_tbe(rows, dim, device, lr)

        def step_a(idx, g, m=a):
            m(idx, offsets).backward(g)

        t_a = _timed(step_a, batches, warmup, steps, device)
        ops_a = _ops_per_step(step_a, batches[0])
        del a

        t_b = {}
        for kernel in kernels:
            inner = _fbgemm_tbe(rows, dim, device, lr)
            b = MBATableBatchedEmbedding(inner, MBAParams(lam=lam, counts="static", kernel=kernel), pooled=True)
            b.mba_count.copy_(counts)

            def step_b(idx, g, m=b):
                m(idx, offsets).backward(g)

            t_b[kernel] = _timed(step_b, batches, warmup, steps, device)
            if kernel == kernels[0]:
                ops_b = _ops_per_step(step_b, batches[0])
            if profile and dim == dims[0] and kernel == kernels[0]:
                _profile(step_b, batches, device)
            del b, inner

        c = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True, device=device)
        n_f = counts.float()

        def step_c(idx, g, m=c, n_f=n_f):
            m(idx, offsets[:-1]).backward(g)
            grad = m.weight.grad.coalesce()
            r, v = grad.indices()[0], grad.values()
            with torch.no_grad():
                w = m.weight.index_select(0, r)
                m.weight.index_copy_(0, r, w - lr * (v + lam * w / n_f.index_select(0, r).unsqueeze(1)))
            m.weight.grad = None

        t_c = _timed(step_c, batches, warmup, steps, device)
        del c
        first = t_b[kernels[0]]
        results.append(
            {
                "dim": dim,
                "a_fbgemm_exact_sgd_ms": round(t_a * 1e3, 3),
                **{f"b_mba_{k}_ms": round(t * 1e3, 3) for k, t in t_b.items()},
                "c_torch_sparse_sgd_l2_ms": round(t_c * 1e3, 3),
                "b_over_a": round(first / t_a, 3),
                "c_over_b": round(t_c / first, 3),
                "a_host_ops_per_step": ops_a,
                "b_host_ops_per_step": ops_b,
            }
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    auto = "triton" if device.type == "cuda" else "cpp"
    return {
        "bench": "embedding",
        "device": name,
        "torch": torch.__version__,
        "mba_kernel_auto": auto,
        "rows": rows,
        "batch": batch,
        "ids_per_sample": ids,
        "zipf": zipf,
        "unique_ids_per_batch": int(np.mean(unique)),
        "lambda": lam,
        "steps": steps,
        "results": results,
    }


def run(args: argparse.Namespace) -> dict:
    try:
        dims = [int(d) for d in args.dims.split(",")]
    except ValueError:
        raise ConfigError(f"bench embedding: --dims {args.dims!r}: expected e.g. 16,64,128") from None
    if any(d % 4 for d in dims):
        raise ConfigError(f"bench embedding: --dims {args.dims}: FBGEMM needs dims divisible by 4")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench embedding: --device cuda but no CUDA device is visible")
    kernels = tuple(args.kernels.split(","))
    bad = [k for k in kernels if k not in ("auto", "cpp", "triton")]
    if bad:
        raise ConfigError(f"bench embedding: --kernels: unknown kernel {bad[0]!r} (auto, cpp, triton)")
    return bench_embedding(
        args.rows,
        dims,
        args.batch,
        args.ids,
        args.zipf,
        args.steps,
        args.warmup,
        args.lam,
        torch.device(args.device),
        kernels,
        profile=args.profile,
    )


if __name__ == "__main__":  # a GPU machine without the install runs it as a module
    parser = argparse.ArgumentParser(prog="bench_embedding")
    add_parser(parser.add_subparsers(dest="bench", required=True))
    print(json.dumps(run(parser.parse_args())))
