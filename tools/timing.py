"""What the benchmarks share: the machine's description, batches read into memory, and the
samples/s of the pipelined training step."""

from __future__ import annotations

import itertools
import os
import platform
import time

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
