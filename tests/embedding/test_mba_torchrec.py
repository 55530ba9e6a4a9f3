"""MBA inside torchrec's sharded kernels (DistributedModelParallel, gloo) against numpy Eq. 7,
under SGD, row-wise Adagrad, Adam and partial row-wise Adam (Adam also without MBA: on the CPU
our kernel is its only one).

One model with a pooled EmbeddingBagCollection (table t1 read by two features, t2 by one) and a
sequence EmbeddingCollection (table s read by a candidate and a history feature). The loss is
Σ output ⊙ C with fixed random C, so d loss / d output = C and the numpy reference knows each
lookup's gradient without autograd: a pooled lookup of sample b gets C_f[b], a sequence lookup i
gets S_f[i]. Ids repeat within a sample, across samples and across the two features of a table.
"""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import CUDA, free_port

pytestmark = pytest.mark.multiprocess

POOLED = {"t1": (40, 8, ["a", "b"]), "t2": (30, 4, ["c"])}
SEQ = {"s": (50, 8, ["x", "hist_x"])}
TABLES = {**POOLED, **SEQ}
B, STEPS, LR = 6, 4, 0.3
B1, B2 = 0.8, 0.95  # Adam's decays, far from the defaults


def make_batches(seed, world=1):
    """STEPS global batches: per feature, lengths [B*world] and ids."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(STEPS):
        feats = {}
        for rows, _, features in TABLES.values():
            hot = rng.integers(0, rows - 8, 6)  # rows >= rows-8 are never touched
            for f in features:
                lengths = rng.integers(0, 5, B * world) if f != "x" else np.ones(B * world, dtype=np.int64)
                ids = rng.choice(hot, lengths.sum())  # few hot ids: repeats everywhere
                feats[f] = (lengths, ids)
        grads = {}
        for name, (_, dim, features) in TABLES.items():
            for f in features:
                n = B * world if name in POOLED else int(feats[f][0].sum())
                grads[f] = rng.standard_normal((n, dim)).astype(np.float32)
        batches.append((feats, grads))
    return batches


def initial_weights(seed):
    rng = np.random.default_rng(seed + 100)
    return {t: rng.standard_normal((rows, dim)).astype(np.float32) for t, (rows, dim, _) in TABLES.items()}


def numpy_reference(batches, w0, lam, counts0, online, base):
    """Eq. 7 under `base` (sgd, rowwise_adagrad, adam, partial_rowwise_adam) step by step, a loop
    over rows and samples; lazy Adam: only touched rows, bias-corrected by the global step. ε is
    torchrec's default of each optimizer (the worker sets none)."""
    eps = 1e-10 if base == "rowwise_adagrad" else 1e-8
    w = {t: v.astype(np.float64).copy() for t, v in w0.items()}
    n = {t: c.astype(np.int64).copy() for t, c in counts0.items()}
    s = {t: np.zeros(len(v)) for t, v in w0.items()}
    m = {t: np.zeros(v.shape) for t, v in w0.items()}
    v2 = {t: np.zeros(v.shape) for t, v in w0.items()}
    for step, (feats, grads) in enumerate(batches, start=1):
        for t, (rows, dim, features) in TABLES.items():
            g = np.zeros((rows, dim))
            touched = set()
            per_sample = {}
            for f in features:
                lengths, ids = feats[f]
                pos = 0
                for b, ln in enumerate(lengths):
                    for _ in range(ln):
                        j = ids[pos]
                        g[j] += grads[f][b] if t in POOLED else grads[f][pos]
                        touched.add(j)
                        per_sample.setdefault(b, set()).add(j)
                        pos += 1
            if online:
                for rows_of_sample in per_sample.values():
                    for j in rows_of_sample:
                        n[t][j] += 1
            for j in sorted(touched):
                gj = g[j] + lam * w[t][j] / max(n[t][j], 1)
                if base == "rowwise_adagrad":
                    s[t][j] += (gj * gj).mean()
                    w[t][j] -= LR * gj / (np.sqrt(s[t][j]) + eps)
                elif base == "sgd":
                    w[t][j] -= LR * gj
                else:
                    m[t][j] = B1 * m[t][j] + (1 - B1) * gj
                    if base == "adam":
                        v2[t][j] = B2 * v2[t][j] + (1 - B2) * gj * gj
                        v_hat = v2[t][j] / (1 - B2**step)
                    else:
                        s[t][j] = B2 * s[t][j] + (1 - B2) * (gj * gj).mean()
                        v_hat = s[t][j] / (1 - B2**step)
                    w[t][j] -= LR * (m[t][j] / (1 - B1**step)) / (np.sqrt(v_hat) + eps)
    return w, n


def worker(rank, world, port, opts, batches, w0, counts0, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import warnings

    warnings.filterwarnings("ignore")
    from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from embedding import mba_tbe
    from embedding.planner import sharders_for
    from trainer.config import SparseOptimizerConfig
    from trainer.sharding import SPARSE_OPTIMIZERS, store_on

    device = torch.device(opts["device"], rank) if opts["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store_on("127.0.0.1", port, world, rank == 0), rank=rank, world_size=world)
    try:
        meta = torch.device("meta")

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ebc = EmbeddingBagCollection(
                    device=meta,
                    tables=[
                        EmbeddingBagConfig(name=t, num_embeddings=r, embedding_dim=d, feature_names=f)
                        for t, (r, d, f) in POOLED.items()
                    ],
                )
                self.ec = EmbeddingCollection(
                    device=meta,
                    tables=[
                        EmbeddingConfig(name=t, num_embeddings=r, embedding_dim=d, feature_names=f)
                        for t, (r, d, f) in SEQ.items()
                    ],
                )

            def forward(self, kjt_bag, kjt_seq, grads):
                pooled = self.ebc(kjt_bag).to_dict()
                seq = self.ec(kjt_seq)
                loss = sum((pooled[f] * grads[f]).sum() for f in kjt_bag.keys())
                return loss + sum((seq[f].values() * grads[f]).sum() for f in kjt_seq.keys())

        model = Model()
        kwargs = {"lr": LR} if "adam" not in opts["base"] else {"lr": LR, "beta1": B1, "beta2": B2}
        apply_optimizer_in_backward(SPARSE_OPTIMIZERS[opts["base"]], model.parameters(), kwargs)
        # lam None: the plain optimizer (sequence tables on the CPU, and Adam: ours, λ = 0; kernel
        # "fbgemm": torchrec's own kernels wherever FBGEMM has one)
        sopt = SparseOptimizerConfig(
            type=opts["base"] + ("_mba" if opts["lam"] is not None else ""),
            lam=opts["lam"] or 0.0,
            counts=opts["counts"],
            kernel=opts["kernel"],
        )
        sharders = sharders_for(sopt)
        # torchrec shards sequence tables (EmbeddingCollection) every way but table-row-wise
        constraints = {
            t: ParameterConstraints(
                sharding_types=["row_wise" if t in SEQ and opts["sharding"] == "table_row_wise" else opts["sharding"]],
                compute_kernels=["fused"],
            )
            for t in TABLES
        }
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device=device.type), constraints=constraints
        )
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)

        def shards():
            for key, st in dmp.state_dict().items():
                for shard in st.local_shards():
                    yield key.split(".")[-2], shard

        with torch.no_grad():
            for t, shard in shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(torch.tensor(w0[t][r0 : r0 + nr, c0 : c0 + nc], device=device))
            for kernel, module in mba_tbe.mba_modules(dmp):
                for table, c in zip(kernel.config.embedding_tables, module.counts_by_table(), strict=True):
                    r0 = table.local_metadata.shard_offsets[0]
                    c.copy_(torch.tensor(counts0[table.name][r0 : r0 + c.numel()], device=device))

        def kjt(feats, names, lo, hi):
            lengths, values = [], []
            for f in names:
                ln, ids = feats[f]
                start = ln[:lo].sum()
                lengths.append(torch.tensor(ln[lo:hi]))
                values.append(torch.tensor(ids[start : start + ln[lo:hi].sum()]))
            return KeyedJaggedTensor(keys=names, values=torch.cat(values).long(), lengths=torch.cat(lengths).int()).to(
                device
            )

        bag_names = [f for _, _, fs in POOLED.values() for f in fs]
        seq_names = [f for _, _, fs in SEQ.values() for f in fs]
        for feats, grads in batches:
            n = len(feats["a"][0]) // world
            lo, hi = rank * n, (rank + 1) * n  # this rank's samples of the global batch
            local = {}
            for f in bag_names:
                local[f] = torch.tensor(grads[f][lo:hi], device=device)
            for f in seq_names:
                ln = feats[f][0]
                local[f] = torch.tensor(grads[f][ln[:lo].sum() : ln[:hi].sum()], device=device)
            # torchrec hands the kernels the gradient of the global-batch mean (÷ world): × world
            loss = dmp(kjt(feats, bag_names, lo, hi), kjt(feats, seq_names, lo, hi), local) * world
            loss.backward()
        weights = [(t, *shard.metadata.shard_offsets, shard.tensor.cpu().numpy().copy()) for t, shard in shards()]
        counts = [
            (table.name, table.local_metadata.shard_offsets[0], c.cpu().numpy().copy())
            for kernel, module in mba_tbe.mba_modules(dmp)
            for table, c in zip(kernel.config.embedding_tables, module.counts_by_table(), strict=True)
        ]
        opt_state = dmp.fused_optimizer.state_dict()["state"]
        opt_keys = sorted(f"{key}:{name}:{type(v).__name__}" for key, st in opt_state.items() for name, v in st.items())
        ours = sorted(t.name for kernel, _ in mba_tbe.mba_modules(dmp) for t in kernel.config.embedding_tables)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"weights": weights, "counts": counts, "opt_keys": opt_keys, "ours": ours})
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # done: no interpreter finalization after gloo (see launch.cli.entry)


def run(tmp_path, world=1, data_world=None, **opts):
    """Train STEPS steps on `world` gloo ranks; returns full weights, counts, optimizer state keys
    and the inputs. The global batches hold B * data_world samples (default: B per rank)."""
    opts = {
        "base": "sgd",
        "lam": 0.5,
        "counts": "online",
        "kernel": "auto",
        "sharding": "table_wise",
        "device": "cpu",
        **opts,
    }
    batches = make_batches(0, data_world or world)
    w0 = initial_weights(0)
    rng = np.random.default_rng(7)
    counts0 = {
        t: rng.integers(0 if opts["counts"] == "online" else 1, 9, r).astype(np.int32)
        for t, (r, _, _) in TABLES.items()
    }
    out = str(tmp_path / f"out{world}.pt")
    mp.start_processes(
        worker, args=(world, free_port(), opts, batches, w0, counts0, out), nprocs=world, start_method="spawn"
    )
    per_rank = torch.load(out, weights_only=False)
    weights = {t: np.full((r, d), np.nan, np.float32) for t, (r, d, _) in TABLES.items()}
    counts = {t: np.full(r, -1, np.int64) for t, (r, _, _) in TABLES.items()}
    for res in per_rank:
        for t, r0, c0, w in res["weights"]:
            weights[t][r0 : r0 + w.shape[0], c0 : c0 + w.shape[1]] = w
        for t, r0, c in res["counts"]:
            counts[t][r0 : r0 + len(c)] = c
    opt_keys = set().union(*(r["opt_keys"] for r in per_rank))
    ours = set().union(*(r["ours"] for r in per_rank))  # the tables our kernel updates
    return dict(weights=weights, counts=counts, opt_keys=opt_keys, ours=ours, batches=batches, w0=w0, counts0=counts0)


CASES = [  # kernel auto is the C++ kernel on the CPU
    dict(base="sgd", counts="online", kernel="auto"),
    dict(base="sgd", counts="static", kernel="cpp"),
    dict(base="rowwise_adagrad", counts="online", kernel="auto"),
    dict(base="rowwise_adagrad", counts="static", kernel="cpp"),
    dict(base="sgd", counts="online", kernel="triton"),
    dict(base="rowwise_adagrad", counts="static", kernel="triton"),
]


def check_against_numpy(res, base, online):
    ref_w, ref_n = numpy_reference(res["batches"], res["w0"], 0.5, res["counts0"], online, base)
    for t, (rows, _, _) in TABLES.items():
        np.testing.assert_allclose(res["weights"][t], ref_w[t], rtol=1e-5, atol=1e-5, err_msg=t)
        assert np.array_equal(res["weights"][t][rows - 8 :], res["w0"][t][rows - 8 :]), f"{t}: untouched rows changed"
        np.testing.assert_array_equal(res["counts"][t], ref_n[t], err_msg=t)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c.values()))
def test_mba_in_torchrec_matches_numpy_eq7(tmp_path, case):
    res = run(tmp_path, **case)
    check_against_numpy(res, case["base"], case["counts"] == "online")
    # n_j is a row-wise state of the fused optimizer, sharded like its table (torchrec names a
    # table's first state `momentum1` whatever it is: with SGD that first state is n_j)
    name = "mba_count" if case["base"] == "rowwise_adagrad" else "momentum1"
    assert {
        f"{p}.{t}.weight:{t}.{name}:ShardedTensor"
        for p, t in [("ebc.embedding_bags", "t1"), ("ebc.embedding_bags", "t2"), ("ec.embeddings", "s")]
    } <= res["opt_keys"], res["opt_keys"]


ADAM_CASES = [
    dict(base="adam", counts="online", kernel="auto"),
    dict(base="partial_rowwise_adam", counts="static", kernel="cpp"),
    dict(base="partial_rowwise_adam", counts="online", kernel="triton"),
]


@pytest.mark.parametrize("case", ADAM_CASES, ids=lambda c: "-".join(c.values()))
def test_adam_mba_in_torchrec_matches_numpy(tmp_path, case):
    """Adam and partial row-wise Adam with MBA through torchrec: our module keeps m, v and n_j,
    exposed as FBGEMM names Adam's states on a GPU (momentum1, exp_avg_sq) and sharded like the
    table (v of partial row-wise Adam row-wise)."""
    res = run(tmp_path, **case)
    check_against_numpy(res, case["base"], case["counts"] == "online")
    for p, t in [("ebc.embedding_bags", "t1"), ("ebc.embedding_bags", "t2"), ("ec.embeddings", "s")]:
        for name in ("momentum1", "exp_avg_sq", "mba_count"):
            assert f"{p}.{t}.weight:{t}.{name}:ShardedTensor" in res["opt_keys"], res["opt_keys"]


@pytest.mark.parametrize("base", ["adam", "partial_rowwise_adam"])
def test_plain_adam_on_the_cpu_is_lazy_adam(tmp_path, base):
    """Without MBA (λ = 0, no counts in the state), on the CPU where FBGEMM has no Adam kernel."""
    res = run(tmp_path, base=base, lam=None)
    ref_w, _ = numpy_reference(res["batches"], res["w0"], 0.0, res["counts0"], False, base)
    for t, (rows, _, _) in TABLES.items():
        np.testing.assert_allclose(res["weights"][t], ref_w[t], rtol=1e-5, atol=1e-5, err_msg=t)
        assert np.array_equal(res["weights"][t][rows - 8 :], res["w0"][t][rows - 8 :]), t
    assert not any("mba_count" in k for k in res["opt_keys"]), res["opt_keys"]


@pytest.mark.parametrize("base", ["sgd", "rowwise_adagrad"])
def test_lambda_zero_and_the_plain_route_equal_fbgemm_fused_optimizer(tmp_path, base):
    """MBA at λ = 0, and the plain optimizer as routed by default (on the CPU every table on our
    kernel, with FBGEMM's states and names), against torchrec's own FUSED kernels and optimizer
    everywhere (`kernel: fbgemm`)."""
    ours = run(tmp_path, base=base, lam=0.0)
    plain = run(tmp_path, base=base, lam=None)
    fbgemm = run(tmp_path, base=base, lam=None, kernel="fbgemm")
    assert ours["ours"] == set(TABLES) and plain["ours"] == set(TABLES) and not fbgemm["ours"]
    assert plain["opt_keys"] == fbgemm["opt_keys"]  # checkpoints move between the two
    for t in TABLES:
        np.testing.assert_allclose(ours["weights"][t], fbgemm["weights"][t], rtol=0, atol=1e-6, err_msg=t)
        np.testing.assert_allclose(plain["weights"][t], fbgemm["weights"][t], rtol=0, atol=1e-6, err_msg=t)


@pytest.mark.parametrize(
    "sharding,base",
    [
        ("table_wise", "sgd"),
        ("column_wise", "rowwise_adagrad"),
        ("table_wise", "adam"),
        ("column_wise", "partial_rowwise_adam"),
    ],
)
def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path, sharding, base):
    two = run(tmp_path, world=2, sharding=sharding, base=base)
    one = run(tmp_path, world=1, data_world=2, sharding=sharding, base=base)
    for t in TABLES:
        np.testing.assert_allclose(two["weights"][t], one["weights"][t], rtol=1e-6, atol=1e-6, err_msg=t)
        np.testing.assert_array_equal(two["counts"][t], one["counts"][t], err_msg=t)
    check_against_numpy(two, base, online=True)


@CUDA
@pytest.mark.parametrize(
    "sharding,base",
    [
        ("table_wise", "sgd"),
        ("row_wise", "rowwise_adagrad"),
        ("column_wise", "sgd"),
        ("table_row_wise", "rowwise_adagrad"),
    ],
)
def test_cuda_nccl_mba_matches_numpy_eq7(tmp_path, sharding, base):
    """On the GPU: NCCL, world size 1, the Triton kernel (kernel auto), every GPU sharding type."""
    res = run(tmp_path, device="cuda", sharding=sharding, base=base)
    check_against_numpy(res, base, online=True)


@CUDA
@pytest.mark.parametrize("base", ["sgd", "rowwise_adagrad", "adam", "partial_rowwise_adam"])
def test_cuda_lambda_zero_equals_fbgemm_fused_optimizer(tmp_path, base):
    """λ = 0 through our Triton kernel against FBGEMM's own fused optimizer (Adam's too, which a
    GPU has)."""
    ours = run(tmp_path, device="cuda", base=base, lam=0.0)["weights"]
    fbgemm = run(tmp_path, device="cuda", base=base, lam=None)["weights"]
    for t in TABLES:
        np.testing.assert_allclose(ours[t], fbgemm[t], rtol=0, atol=1e-6, err_msg=t)
