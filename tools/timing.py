"""What the benchmarks share: the machine's description, batches read into memory, the samples/s
of the pipelined training step, contenders timed in alternating rounds, and the matrix products
of one step against the machine's GEMM rates (`bench peers`)."""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections import Counter

import torch

from trainer.config import Config, ConfigError


def machine() -> dict:
    return {
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def take(cfg: Config, n: int) -> list:
    from trainer.data import stream_from_config

    batches = []
    for b in stream_from_config(cfg, "train").epoch(0):
        batches.append(b)
        if len(batches) == n:
            break
    if len(batches) < n:
        raise ConfigError(f"bench: the training data has only {len(batches)} batches, {n} needed")
    return batches


def alternate(runs: dict, warmup: int, steps: int, rounds: int) -> tuple[list[range], dict[str, list[float]]]:
    """Each `runs[name](indices)` (it runs the steps of those batch indices) once over the warmup
    batches, then the `steps` timed batches split into `rounds` interleaved blocks, every contender
    on each block in turn, so that a change of the machine's speed during the run (a shared host)
    hits them alike. -> (the blocks, each contender's seconds per block)."""
    for run_steps in runs.values():
        run_steps(range(warmup))
    timed = range(warmup, warmup + steps)
    blocks = [timed[k::rounds] for k in range(rounds)] if steps >= rounds else [timed]
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for block in blocks:
        for name, run_steps in runs.items():
            t0 = time.perf_counter()
            run_steps(block)
            seconds[name].append(time.perf_counter() - t0)
    return blocks, seconds


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_pipelined(model, opt, device: torch.device, batches, warmup: int) -> float:
    """Samples/s of the pipelined training step (trainer.step.Steps) over `batches` (a list or an
    iterator) after `warmup` untimed steps; the clock stops when the device is done."""
    from trainer.step import Steps

    sizes: list[int] = []

    def sized():
        for b in batches:
            sizes.append(len(b))
            yield b

    run = Steps(model, opt, device).run(sized())
    for _ in itertools.islice(run, warmup):
        pass
    sync(device)
    t0 = time.perf_counter()
    n, last = 0, None
    for last in run:  # noqa: B007 - the last step's loss is read after the loop
        n += 1
    if last is not None:
        float(last)  # the last step's loss: the device has finished every step
    sync(device)
    seconds = time.perf_counter() - t0
    return sum(sizes[warmup : warmup + n]) / seconds  # the pipeline reads ahead: count the steps run


_GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}  # every overload (out= included)


def gemm_shapes(step) -> list[tuple[int, int, int, int, torch.dtype]]:
    """(batch, m, k, n, dtype) of every matrix product that one call of `step()` runs, forward and
    backward, also those called from C++ (recorded at the dispatcher, so autocast's dtype and
    autograd's products count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[int, int, int, int, torch.dtype]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in _GEMMS:
                a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else (args[0], args[1])
                batch = a.shape[0] if a.dim() == 3 else 1
                seen.append((batch, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype))
            elif name in ("din_attention", "din_attention_backward"):
                seen.extend(_fused_attention_products(name, args))
            return func(*args, **(kwargs or {}))

    with Record():
        step()
    return seen


def _fused_attention_products(name: str, args) -> list[tuple[int, int, int, int, torch.dtype]]:
    """The products that trainer.models.attention's fused op runs inside its C++ (by block, on
    BLAS directly, out of the dispatcher's sight), as the whole [N, ·] products they add up to,
    the output layer's [N, H_L]·u included (a product in the layer-by-layer unit): forward x·W_kᵀ
    per layer; backward ∂W_k = ∂z_kᵀ·x and ∂x = ∂z_k·W_k per layer. The op folds the candidate
    into layer 1 (h·M_s, trainer/models/csrc/attention.cpp) outside bf16, and in bf16 where the
    kernel has AVX512-BF16 pair products: layer 1's products are D wide there, not 2D."""
    from trainer.models.attention import bf16_pairs

    forward = name == "din_attention"
    hist, weights, u, bf16 = (args[0], args[4], args[7], args[9]) if forward else (args[1], args[4], args[6], args[9])
    n, dtype = hist.shape[0], torch.bfloat16 if bf16 else hist.dtype
    shapes = [(w.shape[0], w.shape[1]) for w in weights] + [(1, u.shape[0])]  # (out, in) per layer
    if not bf16 or bf16_pairs():
        shapes[0] = (shapes[0][0], hist.shape[1])  # layer 1 over h alone
    if forward:
        return [(1, n, i, o, dtype) for o, i in shapes]
    return [s for o, i in shapes for s in ((1, o, n, i, dtype), (1, n, o, i, dtype))]


def gemm_account(shapes: list[tuple[int, int, int, int, torch.dtype]], seconds_per_step: float) -> dict:
    """The step's matrix products against the machine's GEMM rates at the same shapes: their
    GFLOP per step, the time each set would take alone as contiguous fp32 and bf16 GEMMs (timed
    here, one shape at a time, the fastest of 5 calls after a warm-up call: a bf16 GEMM's first
    call at a shape is slow), and the GFLOP/s the whole step reaches."""
    flop = sum(2 * b * m * k * n for b, m, k, n, _ in shapes)
    count = Counter((b, m, k, n) for b, m, k, n, _ in shapes)
    alone = {}
    for dtype in (torch.float32, torch.bfloat16):
        total = 0.0
        for (b, m, k, n), c in count.items():
            x, y = torch.randn(b, m, k).to(dtype), torch.randn(b, k, n).to(dtype)
            torch.bmm(x, y)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                torch.bmm(x, y)
                best = min(best, time.perf_counter() - t0)
            total += c * best
        alone[dtype] = total
    gflop = flop / 1e9
    return {
        "gemm_gflop_per_step": round(gflop, 4),
        "gemms_per_step": len(shapes),
        "gemm_dtypes": sorted({str(d).removeprefix("torch.") for *_, d in shapes}),
        "step_ms": round(seconds_per_step * 1e3, 2),
        "step_gflops": round(gflop / seconds_per_step, 1),
        "gemms_alone_ms": {"fp32": round(alone[torch.float32] * 1e3, 2), "bf16": round(alone[torch.bfloat16] * 1e3, 2)},
        "gemm_gflops_at_these_shapes": {
            "fp32": round(gflop / alone[torch.float32], 1),
            "bf16": round(gflop / alone[torch.bfloat16], 1),
        },
    }
