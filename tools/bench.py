"""Benchmarks; each prints one JSON object (the CLI's last line). The layers they measure load
torchrec and Ray, so they are imported inside the functions: `dinrec --help` builds this
module's parsers.

- `dinrec bench loader`: Parquet → Batch throughput of the streaming reader pinned to one core,
  against the rate at which training consumes batches (measured in the same run, in memory).
- `dinrec bench train`: our DIN training step (torchrec modules under DistributedModelParallel,
  the fused sparse optimizer in the backward, jagged attention, torchrec's TrainPipelineSparseDist) against the
  same step without the pipeline (`train_step`, the plain loop), in the other precision (fp32 /
  bf16), with the tower compiled or not (model.compile), with the attention unit fused or layer
  by layer (model.attention_kernel; with PReLU), with the embedding update on our kernel or
  FBGEMM's (sparse_optimizer.kernel), and against a plain-PyTorch DIN
  of the same shape (nn.Embedding with sparse gradients, padded histories), on the same batches,
  alternating in blocks within one run.
- `dinrec bench dien`: DIEN's training step against DIN's on the same data, in the same run, and
  DIEN's sequence kernel (C++ on the CPU, Triton on a GPU) against the Python step loop.
- `dinrec bench e2e`: the training step fed from the Parquet files (the reader, its loader
  workers, the pipeline's copy to the device) against the same step on batches already in memory
  on the device, in one run; on a GPU with the GPU's busy time.
- `dinrec bench peers`: DIN, DIEN and BaseModel steps against DeepCTR-Torch's (tools/peers.py).
- `dinrec bench embedding`: the MBA embedding step against FBGEMM's fused SGD and torch's sparse
  SGD (tools/bench_embedding.py).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import pyarrow as pa
import torch
from torch import nn

from tools import bench_embedding, peers
from tools.timing import alternate, machine, take, time_pipelined
from trainer.config import Config, ConfigError, load_config


def add_parsers(sub: argparse._SubParsersAction, config_args) -> None:
    lo = sub.add_parser("loader", help="streaming reader throughput on one core vs training consumption")
    config_args(lo)
    lo.add_argument("--batches", type=int, default=2000, help="batches read (default: %(default)s)")
    lo.add_argument("--train-steps", type=int, default=100, help="training steps timed (default: %(default)s)")
    lo.add_argument(
        "--compare",
        metavar="SPEC",
        help="the same reader on another copy of data.train (e.g. s3://bucket/train), in the same run",
    )
    wk = sub.add_parser("workers", help="training samples/s through local Ray with 1, 2, … workers")
    config_args(wk)
    wk.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default: %(default)s)")
    wk.add_argument("--steps", type=int, default=600, help="steps per run (default: %(default)s)")
    tr = sub.add_parser("train", help="DIN training step: dinrec vs a plain-PyTorch reference")
    config_args(tr)
    tr.add_argument("--steps", type=int, default=200, help="timed steps per model (default: %(default)s)")
    tr.add_argument("--warmup", type=int, default=20, help="untimed steps first (default: %(default)s)")
    tr.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed blocks, alternating dinrec and the reference (default: %(default)s)",
    )
    tr.add_argument(
        "--models",
        default=None,
        help="instead, time these models' training steps (comma-separated, or `all`) on the config's data, "
        "each against DIN in the same run (e.g. --config configs/zoo_synthetic.yaml --models all)",
    )
    tr.add_argument(
        "--compare-sparse",
        action="store_true",
        help="with --models: each model also with its embedding update on the other kernel (FBGEMM's, "
        "or ours with sparse_optimizer.kernel=fbgemm), in the same alternating blocks",
    )
    dn = sub.add_parser("dien", help="DIEN training step vs DIN's, and DIEN's GRU kernel vs the step loop")
    config_args(dn)
    _steps_and_device(dn, steps=60, warmup=5, what="timed steps per model")
    e2e = sub.add_parser("e2e", help="training from the Parquet files vs on in-memory batches, one process")
    config_args(e2e)
    _steps_and_device(e2e, steps=200, warmup=20, what="timed steps each way")
    bench_embedding.add_parser(sub)
    peers.add_parser(sub, config_args)


def _steps_and_device(p: argparse.ArgumentParser, steps: int, warmup: int, what: str) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"{what} (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: one GPU, NCCL (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> dict:
    if args.bench == "embedding":
        return bench_embedding.run(args)
    if args.bench == "peers":
        return peers.run(args)
    cfg = load_config(args.config, args.overrides)
    if args.bench == "loader":
        return bench_loader(cfg, args.batches, args.train_steps, args.compare)
    if args.bench == "workers":
        try:
            counts = [int(w) for w in args.workers.split(",")]
        except ValueError:
            raise ConfigError(f"bench workers: --workers {args.workers!r}: expected e.g. 1,2") from None
        return bench_workers(cfg, counts, args.steps)
    if args.bench == "dien":
        return bench_dien(cfg, args.steps, args.warmup, args.device)
    if args.bench == "e2e":
        return bench_e2e(cfg, args.steps, args.warmup, args.device)
    if args.models:
        return bench_models(cfg, args.models, args.steps, args.warmup, args.rounds, args.compare_sparse)
    if args.compare_sparse:
        raise ConfigError(
            "bench train: --compare-sparse goes with --models (the DIN bench compares the kernels already)"
        )
    return bench_train(cfg, args.steps, args.warmup, args.rounds)


def _through(steps, data: list):
    """A contender for timing.alternate: the pipelined steps over the batches of the given indices."""

    def run_steps(idx) -> None:
        for _ in steps.run(data[i] for i in idx):
            pass

    return run_steps


def bench_models(cfg: Config, models: str, steps: int, warmup: int, rounds: int, compare_sparse: bool = False) -> dict:
    """Every named model's pipelined training step (the step `dinrec train` runs) on the config's
    first batches, each model's own layout of them, alternated in `rounds` blocks; samples/s and
    the ratio to DIN's, which is always timed too. With `compare_sparse`, each model a second time
    with its embedding update on the other kernel (ours / FBGEMM's), in the same blocks."""
    from dataclasses import replace

    from tools.experiments import parse_variants
    from trainer.models import MODELS
    from trainer.sharding import build_model, dense_optimizer, process_group
    from trainer.step import Steps

    names = list(MODELS) if models == "all" else parse_variants(models, MODELS)
    if "din" not in names:
        names.append("din")
    if rounds < 1:
        raise ConfigError(f"bench train: --rounds must be >= 1, got {rounds}")
    sparse_kernel = "fbgemm" if cfg.sparse_optimizer.kernel == "fbgemm" else "ours"
    other_sparse = "ours" if sparse_kernel == "fbgemm" else "fbgemm"
    flipped = replace(cfg.sparse_optimizer, kernel="auto" if sparse_kernel == "fbgemm" else "fbgemm")
    data, runs = {}, {}
    with process_group(cfg) as (_, world):
        for name in names:
            mcfg = replace(cfg, model=replace(cfg.model, name=name))
            data[name] = take(mcfg, warmup + steps)  # the model's layout: pooled or jagged histories, negatives
            variants = [(name, mcfg)]
            if compare_sparse:
                variants.append((f"{name}/{other_sparse}", replace(mcfg, sparse_optimizer=flipped)))
            for key, c in variants:
                model = build_model(c, world, torch.device("cpu"))
                runs[key] = _through(Steps(model, dense_optimizer(c, model), torch.device("cpu")), data[name])
        blocks, seconds = alternate(runs, warmup, steps, rounds)
    samples = {name: sum(len(b[i]) for blk in blocks for i in blk) for name, b in data.items()}
    rate = {name: samples[name] / sum(seconds[name]) for name in data}
    out = {
        "bench": "train_models",
        **machine(),
        "batch_size": cfg.data.batch_size,
        "steps": steps,
        "rounds": len(blocks),
        "precision": cfg.model.precision,
        "compile": cfg.model.compile,
        "sparse_optimizer": cfg.sparse_optimizer.type,
        "sparse_kernel": sparse_kernel,
        "models": {
            name: {"samples_per_s": round(r, 1), "ratio_to_din": round(r / rate["din"], 3)} for name, r in rate.items()
        },
    }
    if compare_sparse:
        for name in data:
            other = samples[name] / sum(seconds[f"{name}/{other_sparse}"])
            by = {sparse_kernel: rate[name], other_sparse: other}
            out["models"][name]["samples_per_s_by_sparse_kernel"] = {k: round(v, 1) for k, v in by.items()}
            out["models"][name]["ratio_ours_over_fbgemm_sparse"] = round(by["ours"] / by["fbgemm"], 3)
    return out


def _read_on_one_core(cfg: Config, batches: int) -> tuple[int, int, float]:
    """(batches, rows, seconds) of the reader over data.train, pinned to one core with Arrow's own
    thread pools at one thread."""
    from trainer.data import stream_from_config

    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(all_cpus)})
    cpu_count, io_count = pa.cpu_count(), pa.io_thread_count()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    try:
        t0 = time.perf_counter()
        stream = stream_from_config(cfg, "train")  # lists the files and reads their footers: timed too
        n_rows, n_batches = 0, 0
        for b in stream.epoch(0):
            n_rows += len(b)
            n_batches += 1
            if n_batches == batches:
                break
        return n_batches, n_rows, time.perf_counter() - t0
    finally:
        os.sched_setaffinity(0, all_cpus)
        pa.set_cpu_count(cpu_count)
        pa.set_io_thread_count(io_count)


def bench_loader(cfg: Config, batches: int, train_steps: int, compare: str | None = None) -> dict:
    from dataclasses import replace

    from trainer.sharding import build_model, dense_optimizer, process_group

    host = machine()
    n_batches, n_rows, loader_seconds = _read_on_one_core(cfg, batches)
    loader_rate = n_rows / loader_seconds
    other = {}
    if compare:  # the same rows from another store (object storage: range reads of each row group)
        c_batches, c_rows, c_seconds = _read_on_one_core(replace(cfg, data=replace(cfg.data, train=compare)), batches)
        other = {
            "compare_data": compare,
            "compare_samples": c_rows,
            "compare_seconds": round(c_seconds, 3),
            "compare_samples_per_s": round(c_rows / c_seconds, 1),
            "compare_over_loader": round(c_rows / c_seconds / loader_rate, 3),
        }
    # --- what training consumes: the training step on in-memory batches, all cores
    data = take(cfg, train_steps + 10)
    with process_group(cfg) as (_, world):
        model = build_model(cfg, world, torch.device("cpu"))
        opt = dense_optimizer(cfg, model)
        train_rate = time_pipelined(model, opt, torch.device("cpu"), data, warmup=10)
    return {
        "bench": "loader",
        **host,
        "data": cfg.data.train,
        "loader_cores": 1,
        "loader_batches": n_batches,
        "loader_samples": n_rows,
        "loader_seconds": round(loader_seconds, 3),
        "loader_samples_per_s": round(loader_rate, 1),
        "train_model": cfg.model.name,
        "train_samples_per_s": round(train_rate, 1),
        "loader_over_train": round(loader_rate / train_rate, 2),
        **other,
        "batch_size": cfg.data.batch_size,
    }


def bench_train(cfg: Config, steps: int, warmup: int, rounds: int = 5) -> dict:
    from dataclasses import replace

    from embedding.layout import FeatureLayout
    from tools.reference import ReferenceDIN, padded_inputs
    from trainer.models.layers import resolved_precision
    from trainer.sharding import build_model, dense_optimizer, process_group
    from trainer.step import Steps, train_step

    if cfg.model.name != "din":
        raise ConfigError(f"bench train: model.name must be din (the reference is a DIN), got {cfg.model.name}")
    layout = FeatureLayout.from_config(cfg)
    if layout.pooled_tables or cfg.data.dense_features:
        raise ConfigError(
            "bench train: the reference DIN takes behaviour tables only (no pooled tables, no dense features)"
        )
    if cfg.sparse_optimizer.type != "sgd":
        raise ConfigError("bench train: set sparse_optimizer.type=sgd (the reference uses SGD on sparse gradients)")
    if cfg.dense_optimizer.type != "adam":
        raise ConfigError("bench train: set dense_optimizer.type=adam (as the reference)")
    if rounds < 1:
        raise ConfigError(f"bench train: --rounds must be >= 1, got {rounds}")
    data = take(cfg, warmup + steps)
    lr = cfg.sparse_optimizer.lr
    with process_group(cfg) as (_, world):
        # --- ours: the pipelined step training runs, and the same step without the pipeline
        model = build_model(cfg, world, torch.device("cpu"))
        opt = dense_optimizer(cfg, model)
        pipelined = Steps(model, opt, torch.device("cpu"))
        plain_model = build_model(cfg, world, torch.device("cpu"))
        plain_opt = dense_optimizer(cfg, plain_model)
        precision = resolved_precision(cfg.model.precision, torch.device("cpu"))
        other = "bf16" if precision == "fp32" else "fp32"  # the other precision, pipelined
        other_cfg = replace(cfg, model=replace(cfg.model, precision=other))
        other_model = build_model(other_cfg, world, torch.device("cpu"))
        other_steps = Steps(other_model, dense_optimizer(other_cfg, other_model), torch.device("cpu"))
        flip_cfg = replace(cfg, model=replace(cfg.model, compile=not cfg.model.compile))  # the tower (not) compiled
        flip_model = build_model(flip_cfg, world, torch.device("cpu"))
        flip_steps = Steps(flip_model, dense_optimizer(flip_cfg, flip_model), torch.device("cpu"))
        # the attention unit the other way (fused / layer by layer), where the fused op applies
        kernel = _attention_kernel(cfg, precision)
        att_steps = None
        if kernel is not None:
            flipped = "layers" if kernel == "fused" else "fused"
            att_cfg = replace(cfg, model=replace(cfg.model, attention_kernel=flipped))
            att_model = build_model(att_cfg, world, torch.device("cpu"))
            att_steps = Steps(att_model, dense_optimizer(att_cfg, att_model), torch.device("cpu"))
        # the embedding update the other way: FBGEMM's kernel against ours (sequence tables on the CPU)
        sparse_kernel = "fbgemm" if cfg.sparse_optimizer.kernel == "fbgemm" else "ours"
        fb_cfg = replace(
            cfg,
            sparse_optimizer=replace(cfg.sparse_optimizer, kernel="auto" if sparse_kernel == "fbgemm" else "fbgemm"),
        )
        fb_model = build_model(fb_cfg, world, torch.device("cpu"))
        fb_steps = Steps(fb_model, dense_optimizer(fb_cfg, fb_model), torch.device("cpu"))

        def plain_steps(idx) -> None:
            for i in idx:
                train_step(plain_model, plain_opt, data[i])

        # --- reference: same shapes and optimizers, inputs padded in advance (not timed)
        torch.manual_seed(cfg.train.seed)
        ref = ReferenceDIN(layout, cfg.model)
        sparse_params = list(ref.tables.parameters())
        dense_params = [p for n, p in ref.named_parameters() if not n.startswith("tables.")]
        sparse_opt = torch.optim.SGD(sparse_params, lr=lr)
        dense_opt = torch.optim.Adam(dense_params, lr=cfg.dense_optimizer.lr)
        padded = [padded_inputs(b, layout) for b in data]

        def ref_steps(idx) -> None:
            for i in idx:
                cand, hist, mask = padded[i]
                loss = nn.functional.binary_cross_entropy_with_logits(ref(cand, hist, mask), data[i].labels)
                sparse_opt.zero_grad(set_to_none=True)
                dense_opt.zero_grad(set_to_none=True)
                loss.backward()
                sparse_opt.step()
                dense_opt.step()

        runs = {
            "ours": _through(pipelined, data),
            "plain": plain_steps,
            "other": _through(other_steps, data),
            "flip": _through(flip_steps, data),
            "reference": ref_steps,
        }
        if att_steps is not None:
            runs["attention"] = _through(att_steps, data)
        runs["sparse_kernel"] = _through(fb_steps, data)
        blocks, seconds = alternate(runs, warmup, steps, rounds)
    samples = [sum(len(data[i]) for i in block) for block in blocks]
    ours = sum(samples) / sum(seconds["ours"])
    plain = sum(samples) / sum(seconds["plain"])
    rate = {precision: ours, other: sum(samples) / sum(seconds["other"])}
    flip = sum(samples) / sum(seconds["flip"])
    compiled, eager = (ours, flip) if cfg.model.compile else (flip, ours)
    reference = sum(samples) / sum(seconds["reference"])
    per_round = [r / o for o, r in zip(seconds["ours"], seconds["reference"], strict=True)]
    by_kernel = None
    if kernel is not None:
        other_kernel = "layers" if kernel == "fused" else "fused"
        by_kernel = {kernel: ours, other_kernel: sum(samples) / sum(seconds["attention"])}
    other_sparse = "ours" if sparse_kernel == "fbgemm" else "fbgemm"
    by_sparse = {sparse_kernel: ours, other_sparse: sum(samples) / sum(seconds["sparse_kernel"])}
    hist_feature = layout.pairs[0][1]
    mean_hist = sum(float(b.feature(hist_feature).lengths().sum()) for b in data) / sum(len(b) for b in data)
    return {
        "bench": "train",
        **machine(),
        "model": "din",
        "batch_size": cfg.data.batch_size,
        "steps": steps,
        "max_hist_len": cfg.data.max_hist_len,
        "mean_hist_len": round(mean_hist, 2),
        "sparse_optimizer": "sgd",
        "dense_optimizer": "adam",
        "rounds": len(blocks),
        "dinrec_samples_per_s": round(ours, 1),
        "dinrec_plain_loop_samples_per_s": round(plain, 1),
        "reference_samples_per_s": round(reference, 1),
        "ratio_dinrec_over_reference": round(ours / reference, 3),
        "ratio_pipeline_over_plain_loop": round(ours / plain, 3),
        "precision": precision,
        "samples_per_s_by_precision": {k: round(v, 1) for k, v in rate.items()},
        "ratio_bf16_over_fp32": round(rate["bf16"] / rate["fp32"], 3),
        "compile": cfg.model.compile,
        "samples_per_s_by_compile": {"eager": round(eager, 1), "compiled": round(compiled, 1)},
        "ratio_compiled_over_eager": round(compiled / eager, 3),
        "attention_kernel": kernel,
        "samples_per_s_by_attention_kernel": {k: round(v, 1) for k, v in by_kernel.items()} if by_kernel else None,
        "ratio_fused_over_layers": round(by_kernel["fused"] / by_kernel["layers"], 3) if by_kernel else None,
        "samples_per_s_by_sparse_kernel": {k: round(v, 1) for k, v in by_sparse.items()},
        "ratio_ours_over_fbgemm_sparse": round(by_sparse["ours"] / by_sparse["fbgemm"], 3),
        "ratio_per_round": [round(r, 3) for r in per_round],
    }


def _attention_kernel(cfg: Config, precision: str) -> str | None:
    """The attention unit the config's DIN runs on the CPU: "fused" or "layers"; None with Dice,
    which only the layers take."""
    if cfg.model.activation != "prelu":
        return None
    if cfg.model.attention_kernel == "auto":
        return "fused" if precision == "fp32" else "layers"
    return cfg.model.attention_kernel


def bench_workers(cfg: Config, counts: list[int], steps: int) -> dict:
    """The config's training through local Ray at each worker count (same per-rank batch size,
    `steps` steps each, then the full evaluation; each worker with launch.cpus_per_worker cores,
    by default the machine's divided among them); global training samples/s of each run."""
    import tempfile
    from dataclasses import replace

    from launch import launcher

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in counts:
            c = replace(
                cfg,
                launch=replace(cfg.launch, launcher="ray", workers=w),
                train=replace(cfg.train, epochs=1, limit_batches=steps, out_dir=f"{tmp}/w{w}"),
            )
            r = launcher.run(replace(c, launch=replace(c.launch, ray_address=None)))
            runs[str(w)] = {
                "torch_threads_per_worker": r["torch_threads"],
                "train_samples_per_s": r["train_samples_per_s"],
                "steps": r["steps"],
                "train_samples": r["train_samples"],
                "auc": r["auc"],
            }
    base = runs[str(counts[0])]["train_samples_per_s"]
    return {
        "bench": "workers",
        **machine(),
        "model": cfg.model.name,
        "batch_size_per_worker": cfg.data.batch_size,
        "runs": runs,
        "speedup_over_first": {w: round(r["train_samples_per_s"] / base, 3) for w, r in runs.items()},
    }


def bench_dien(cfg: Config, steps: int, warmup: int, device: str = "cpu") -> dict:
    """Training samples/s, one process, on the first batches of the training data: DIN, DIEN
    (the config's evolution variant, C++ GRU kernel) and the same DIEN with the Python step loop.
    Each model reads its own copy of the same batches (DIEN's carry sampled negatives)."""
    from dataclasses import replace

    from embedding.layout import FeatureLayout
    from trainer.sharding import build_model, dense_optimizer, process_group

    if cfg.model.name != "dien":
        raise ConfigError(f"bench dien: model.name must be dien, got {cfg.model.name}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("bench dien: --device cuda, but torch sees no GPU")
        cfg = replace(cfg, launch=replace(cfg.launch, use_gpu=True))
    variants = {
        "din": replace(cfg, model=replace(cfg.model, name="din")),
        "dien": cfg,
        "dien_step_loop": replace(cfg, model=replace(cfg.model, gru_kernel="loop")),
    }
    if device == "cuda":  # the C++ kernel's ATen path: one set of small kernels per time step
        variants["dien_cpp_aten"] = replace(cfg, model=replace(cfg.model, gru_kernel="cpp"))
    rates = {}
    for name, c in variants.items():
        data = [b.to(device) for b in take(c, warmup + steps)]
        with process_group(c) as (_, world):
            torch.manual_seed(c.train.seed)
            model = build_model(c, world, torch.device(device))
            opt = dense_optimizer(c, model)
            model.train()
            rates[name] = time_pipelined(model, opt, torch.device(device), data, warmup)
        if name == "dien":  # the same rows for every variant: measure the histories once
            hist = FeatureLayout.from_config(c).pairs[0][1]
            mean_hist = sum(float(b.feature(hist).lengths().sum()) for b in data) / sum(len(b) for b in data)
    return {
        "bench": "dien",
        **machine(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "batch_size": cfg.data.batch_size,
        "steps": steps,
        "max_hist_len": cfg.data.max_hist_len,
        "mean_hist_len": round(mean_hist, 2),
        "evolution": cfg.model.evolution,
        "aux_loss": cfg.model.aux_loss,
        "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "dien_over_din": round(rates["dien"] / rates["din"], 3),
        "gru_kernel": "triton" if device == "cuda" else "cpp",
        "kernel_over_step_loop": round(rates["dien"] / rates["dien_step_loop"], 3),
        **({"triton_over_cpp_aten": round(rates["dien"] / rates["dien_cpp_aten"], 3)} if device == "cuda" else {}),
    }


def _gpu_busy(model, opt, device: torch.device, batches, steps: int) -> float:
    """The share of wall time in which the GPU runs a kernel (the union of the kernels' intervals,
    from torch.profiler) over `steps` pipelined steps fed from `batches`; measured under the
    profiler, so a little below the unprofiled run's."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.step import Steps

    run = Steps(model, opt, device).run(batches)
    next(run)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in itertools.islice(run, steps):
            pass
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / wall_us


def bench_e2e(cfg: Config, steps: int, warmup: int, device: str = "cpu") -> dict:
    """The config's training step, one process, fed two ways in one run: from the Parquet files
    (the reader with data.loader_workers processes, the pipeline's copy to the device) and from
    batches already in memory on the device; their samples/s and ratio, and on a GPU the GPU's
    busy share when fed from the files."""
    from dataclasses import replace

    from trainer.data import stream_from_config
    from trainer.sharding import build_model, dense_optimizer, process_group

    if steps < 1 or warmup < 1:
        raise ConfigError(f"bench e2e: --steps and --warmup must be >= 1, got {steps} and {warmup}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("bench e2e: --device cuda, but torch sees no GPU")
        cfg = replace(cfg, launch=replace(cfg.launch, use_gpu=True))
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    in_memory = [b.to(dev) for b in take(cfg, warmup + steps)]
    rates: dict[str, float] = {}
    busy = None
    with process_group(cfg) as (_, world):

        def fresh():
            torch.manual_seed(cfg.train.seed)
            model = build_model(cfg, world, dev)
            model.train()
            return model, dense_optimizer(cfg, model)

        rates["in_memory"] = time_pipelined(*fresh(), dev, in_memory, warmup)
        del in_memory
        stream = stream_from_config(cfg, "train")
        try:
            rates["parquet"] = time_pipelined(*fresh(), dev, itertools.islice(stream.epoch(0), warmup + steps), warmup)
            if device == "cuda":
                busy = _gpu_busy(*fresh(), dev, stream.epoch(0), min(steps, 50))
        finally:
            stream.close()
    return {
        "bench": "e2e",
        **machine(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": cfg.model.name,
        "sparse_optimizer": cfg.sparse_optimizer.type,
        "batch_size": cfg.data.batch_size,
        "loader_workers": cfg.data.loader_workers,
        "steps": steps,
        "samples_per_s": {k: round(v, 1) for k, v in rates.items()},
        "parquet_over_in_memory": round(rates["parquet"] / rates["in_memory"], 3),
        "gpu_busy_fraction_from_parquet": round(busy, 3) if busy is not None else None,
    }
