"""The MBA fused optimizer inside torchrec's sharded embedding kernels.

How it plugs in (one mechanism for every sharding type and both collection kinds):

- The base optimizer (SGD, row-wise Adagrad, Adam or partial row-wise Adam: FBGEMM's EXACT_SGD,
  EXACT_ROWWISE_ADAGRAD, ADAM, PARTIAL_ROWWISE_ADAM) is given to torchrec as usual
  (apply_optimizer_in_backward); the sharders' `fused_params` add an `mba` entry (`MBAParams`),
  which torchrec merges into every table group's fused_params. The plain optimizers (no MBA) take
  the same path on the CPU (`MBAParams.plain`: FBGEMM has no CPU kernel for Adam, and ours was
  measured faster for SGD and row-wise Adagrad); on a GPU they are FBGEMM's own.
- `install()` wraps the kernel factory of torchrec's two grouped lookups
  (`GroupedPooledEmbeddingsLookup` for EmbeddingBagCollection, `GroupedEmbeddingsLookup` for
  EmbeddingCollection): a FUSED group whose fused_params carry `mba` gets `MBAFusedEmbeddingBag` /
  `MBAFusedEmbedding`; every other group gets torchrec's own kernel. The sharding classes,
  input/output dists, planner, sharded state_dict and fused-optimizer plumbing are torchrec's.
- Those kernels are torchrec's `BatchedFusedEmbeddingBag` / `BatchedFusedEmbedding` whose FBGEMM
  module (the weights and the Adagrad state of the shard, on the device that torchrec chose) is
  wrapped by `MBATableBatchedEmbedding`: its forward is the lookup, its backward is the fused MBA
  update of embedding.mba on the touched rows. It owns `mba_count`, the per-row n_j (int32, 4
  bytes per row), which the fused optimizer exposes as a row-wise state sharded like its table
  (column-wise shards each keep their rows' counts): `<table>.mba_count` after Adagrad's
  `<table>.momentum1`, or, with SGD, `<table>.momentum1` itself (torchrec names a table's first
  optimizer state momentum1 whatever it holds).
- Adam's states are ours too (FBGEMM's CPU module cannot hold them: it is built as EXACT_SGD, a
  holder of the weights): m and v per element (partial row-wise Adam: v per row), fp32, exposed
  as FBGEMM exposes them on a GPU, `<table>.momentum1` (m) and `<table>.exp_avg_sq` (v), so that
  checkpoints move between the two. The step t of the bias corrections counts this module's
  updates; a resumed run sets it from the checkpoint's step (torchrec's `set_optimizer_step`),
  as FBGEMM's `iter`.

Gradients: torchrec's collectives hand the kernel the gradient of the global-batch mean loss
(they divide by the world size), so the per-row sum over occurrences is ḡ_j of Eq. 7 whatever the
sharding; the 2-rank = 1-rank tests check this.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embedding import mba, mba_cpp, mba_triton

MBA_KEY = "mba"
OWN_STATES = ("adam", "partial_rowwise_adam")  # optimizers whose states this module keeps
KERNELS = ("auto", "cpp", "triton")  # the MBA row update: embedding.mba_cpp, embedding.mba_triton


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' is Triton on CUDA and C++ on the CPU."""
    if kernel not in KERNELS:
        raise ValueError(f"MBA kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "cpp"
    if kernel == "triton" and not mba_triton.triton_usable(device):
        raise ValueError("MBA kernel 'triton' needs a CUDA device or TRITON_INTERPRET=1 with triton installed")
    if kernel == "cpp" and device.type != "cpu":
        raise ValueError(f"MBA kernel 'cpp' runs on the CPU, the tables are on {device}")
    return kernel


# per resolved kernel: how the occurrences are built, and the row update
PATHS = {
    "cpp": (mba_cpp.occurrences_cpp, mba_cpp.update_rows_cpp),
    "triton": (mba_triton.occurrences_triton, mba_triton.update_rows_triton),
}


@dataclass(frozen=True)
class MBAParams:
    """The MBA part of a table group's fused_params (hashable: torchrec groups tables by it)."""

    lam: float
    counts: str = "online"  # online | static
    kernel: str = "auto"  # auto | cpp | triton
    # no MBA (λ = 0, no counts, FBGEMM's optimizer states): our kernel on the CPU, where FBGEMM has
    # none for Adam and partial row-wise Adam and ours was measured faster for SGD and row-wise
    # Adagrad (docs/mba.md, "The plain optimizers on our kernel"); FBGEMM's kernels on a GPU
    # (`route` in install)
    plain: bool = False

    def __post_init__(self) -> None:
        if self.counts not in ("online", "static"):
            raise ValueError(f"MBA counts must be 'online' or 'static', got {self.counts!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"MBA kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.lam < 0:
            raise ValueError(f"MBA lambda must be >= 0, got {self.lam}")
        if self.plain and (self.lam != 0 or self.counts != "static"):
            raise ValueError("MBAParams.plain: lambda 0 and no online counts")


class _LookupWithMBA(torch.autograd.Function):
    """Forward: the batch's occurrences, then the lookup. Backward: the MBA update on the touched
    rows; no gradient flows to the weights (they are updated in place, as in FBGEMM's fused
    backward)."""

    @staticmethod
    def forward(
        ctx, placeholder: torch.Tensor, module: MBATableBatchedEmbedding, indices: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        ctx.module, ctx.batch = module, module._batch_size(offsets)
        lin, src, sample = module.occurrences(indices, offsets, samples=module.params.counts == "online")
        ctx.save_for_backward(lin, src, sample)
        return module.lookup(indices, offsets, lin)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        lin, src, sample = ctx.saved_tensors
        ctx.module.apply_update(lin, src, sample, ctx.batch, grad_output.contiguous())
        return None, None, None, None


@dataclass
class _Group:
    """What a module derives from FBGEMM's storage once (rebuilt if the storage moves)."""

    key: tuple[int, ...]
    weights: list[torch.Tensor]  # per table [rows_t, D_t], views of FBGEMM's storage
    states: list[dict[str, torch.Tensor]]  # per table, the optimizer's states (views)
    layout: mba.TableLayout
    feature_table: torch.Tensor  # [F] int64
    feature_col: torch.Tensor  # [F] int64: first column of each feature in the pooled output
    flat: torch.Tensor | None  # [Σ rows_t, D] when all tables share one dim and lie in row order


class MBATableBatchedEmbedding(nn.Module):
    """An FBGEMM table-batched embedding module (pooled or not) whose optimizer is MBA.

    The FBGEMM module `inner` keeps its storage, placement, Adagrad state, learning rate and
    everything torchrec asks of it (attribute access falls through to it); this module replaces
    its forward/backward. `rule`: the optimizer (embedding.mba.RULES); None is the inner module's
    (SGD or row-wise Adagrad); Adam and partial row-wise Adam run on an EXACT_SGD module, whose
    weights they update, with their states here.
    """

    def __init__(self, inner: nn.Module, params: MBAParams, pooled: bool, rule: str | None = None) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType

        base = {EmbOptimType.EXACT_SGD: "sgd", EmbOptimType.EXACT_ROWWISE_ADAGRAD: "rowwise_adagrad"}
        if inner.optimizer not in base:
            raise ValueError(f"MBA runs on top of EXACT_SGD or EXACT_ROWWISE_ADAGRAD, not {inner.optimizer}")
        if rule is not None and (rule not in OWN_STATES or inner.optimizer != EmbOptimType.EXACT_SGD):
            raise ValueError(f"MBA {rule}: runs on an EXACT_SGD module ({', '.join(OWN_STATES)})")
        self.inner = inner
        self.params = params
        self.pooled = pooled
        self.rule = rule or base[inner.optimizer]
        self.feature_table_map = list(inner.feature_table_map)
        specs = [(int(s[0]), int(s[1])) for s in inner.embedding_specs]
        self.table_rows = [r for r, _ in specs]
        self.table_dims = [d for _, d in specs]
        weights = inner.split_embedding_weights() if specs else []
        device = weights[0].device if specs else torch.device("cpu")
        self.register_buffer("mba_count", torch.zeros(sum(self.table_rows), dtype=torch.int32, device=device))
        if self.rule in OWN_STATES:  # m laid out as the weights' storage; v too (Adam) or one per row
            size = weights[0].untyped_storage().nbytes() // weights[0].element_size() if specs else 0
            self.register_buffer("exp_avg", torch.zeros(size, device=device))
            v_size = size if self.rule == "adam" else sum(self.table_rows)
            self.register_buffer("exp_avg_sq", torch.zeros(v_size, device=device))
        self._lr = float(inner.get_learning_rate())
        args = inner.optimizer_args  # ε, β1, β2 as FBGEMM was given them
        self._hyper = {"eps": float(args.eps), "beta1": float(args.beta1), "beta2": float(args.beta2)}
        self._step = 0  # the updates so far: Adam's t
        # A parameter that requires grad so that autograd reaches our backward (FBGEMM does the same).
        self.placeholder = nn.Parameter(torch.zeros(0, device=device), requires_grad=True)
        self._occurrences, self._update = PATHS[resolve_kernel(params.kernel, device)]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    # ---- what torchrec asks of an FBGEMM module -------------------------------------------------
    def counts_by_table(self) -> list[torch.Tensor]:
        return list(torch.split(self.mba_count, self.table_rows))

    def split_embedding_weights(self) -> list[torch.Tensor]:
        return self.inner.split_embedding_weights()

    def get_optimizer_state(self) -> list[dict[str, torch.Tensor]]:
        states = self._group().states
        if self.params.plain:  # no n_j: the states FBGEMM's own kernel would have
            return [dict(s) for s in states]
        return [{**s, "mba_count": c} for s, c in zip(states, self.counts_by_table(), strict=True)]

    def split_optimizer_states(self) -> list[list[torch.Tensor]]:
        return [list(s.values()) for s in self.get_optimizer_state()]

    def set_learning_rate(self, lr: float) -> None:
        self.inner.set_learning_rate(lr)
        self._lr = float(lr)

    def get_learning_rate(self) -> float:
        return self._lr

    def set_optimizer_step(self, step: int) -> None:
        """The number of updates so far (Adam's t of the next update is step + 1)."""
        self._step = int(step)

    # ---- forward / backward ---------------------------------------------------------------------
    def _storage_key(self) -> tuple[int, ...]:
        """Where FBGEMM's weight storages are now (cheap: no per-table views)."""
        inner = self.inner
        own = [getattr(self, name).data_ptr() for name in ("exp_avg", "exp_avg_sq") if name in self._buffers]
        return (*(getattr(inner, n).data_ptr() for n in ("weights_dev", "weights_host", "weights_uvm")), *own)

    def _group(self) -> _Group:
        key = self._storage_key()
        group = self.__dict__.get("_group_cache")
        if group is None or group.key != key:
            weights = self.inner.split_embedding_weights()
            states, momenta, exp_avg, exp_avg_sq = self._states(weights)
            device = weights[0].device
            ftm = torch.tensor(self.feature_table_map, dtype=torch.int64, device=device)
            dims = [self.table_dims[t] for t in self.feature_table_map]
            col = torch.tensor([0] + dims[:-1], dtype=torch.int64).cumsum(0).to(device)
            layout = mba.TableLayout.of(weights, momenta, self.mba_count, exp_avg, exp_avg_sq)
            d, start = self.table_dims[0], weights[0].storage_offset()
            first_rows = itertools.accumulate(self.table_rows[:-1], initial=0)  # each table's first linear row
            in_row_order = all(
                w.shape[1] == d and w.storage_offset() == start + r * d
                for w, r in zip(weights, first_rows, strict=True)
            )
            flat = layout.weight[start : start + layout.num_rows * d].view(-1, d) if in_row_order else None
            group = _Group(key, weights, states, layout, ftm, col, flat)
            self.__dict__["_group_cache"] = group
        return group

    def _states(self, weights: list[torch.Tensor]):
        """Per table its optimizer states (views, FBGEMM's names), and the layout's: the row-wise
        state's per-table views, the element-wise states flat."""
        if self.rule == "sgd":
            return [{} for _ in weights], None, None, None
        if self.rule == "rowwise_adagrad":
            states = self.inner.get_optimizer_state()
            return states, [s["sum"] for s in states], None, None
        m, v = self.exp_avg, self.exp_avg_sq

        def elementwise(x, w):
            return x[w.storage_offset() : w.storage_offset() + w.numel()].view_as(w)

        if self.rule == "adam":
            states = [{"exp_avg": elementwise(m, w), "exp_avg_sq": elementwise(v, w)} for w in weights]
            return states, None, m, v
        rowwise = list(torch.split(v, self.table_rows))
        states = [{"exp_avg": elementwise(m, w), "exp_avg_sq": r} for w, r in zip(weights, rowwise, strict=True)]
        return states, rowwise, m, None

    def _batch_size(self, offsets: torch.Tensor) -> int:
        n_features = len(self.feature_table_map)
        bags = offsets.numel() - 1
        if n_features == 0 or bags % n_features:
            raise ValueError(
                f"MBA lookup: {bags} bags for {n_features} features (variable batch sizes are not supported)"
            )
        return bags // n_features

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, per_sample_weights=None, **kwargs) -> torch.Tensor:
        if per_sample_weights is not None or kwargs:
            raise ValueError("MBA embeddings do not support per-sample weights or variable batch sizes")
        indices, offsets = indices.long(), offsets.long()
        if torch.is_grad_enabled():
            return _LookupWithMBA.apply(self.placeholder, self, indices, offsets)
        lin = indices if len(self.table_rows) == 1 else self.occurrences(indices, offsets, samples=False)[0]
        return self.lookup(indices, offsets, lin)

    def occurrences(
        self, indices: torch.Tensor, offsets: torch.Tensor, samples: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The batch's lookups as occurrences (linear row, gradient offset, sample): embedding.mba."""
        group = self._group()
        bags = mba.Bags(self._batch_size(offsets), group.feature_table, group.feature_col, self.pooled)
        stride = sum(self.table_dims[t] for t in self.feature_table_map) if self.pooled else self.table_dims[0]
        return self._occurrences(group.layout, bags, indices, offsets, stride, samples)

    def lookup(self, indices: torch.Tensor, offsets: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        """Pooled: [B, Σ D_f], the bags' sums, feature after feature; sequence: [N, D], a row per
        lookup. lin: the lookups' linear rows."""
        group = self._group()
        b = self._batch_size(offsets)
        if group.flat is not None:  # one lookup over the group's rows, without a device sync
            if not self.pooled:
                return nn.functional.embedding(lin, group.flat).float()
            out = nn.functional.embedding_bag(lin, group.flat, offsets, mode="sum", include_last_offset=True).float()
            n_features = len(self.feature_table_map)
            return out if n_features == 1 else out.view(n_features, b, -1).transpose(0, 1).reshape(b, -1)
        bounds = offsets[::b].tolist()  # tables of several dims: per feature (a device sync)
        outs = []
        for f, t in enumerate(self.feature_table_map):
            ids = indices[bounds[f] : bounds[f + 1]]
            if self.pooled:
                off = offsets[f * b : (f + 1) * b + 1]
                if f:
                    off = off - bounds[f]
                outs.append(
                    nn.functional.embedding_bag(
                        ids, group.weights[t], off, mode="sum", include_last_offset=True
                    ).float()
                )
            else:
                outs.append(nn.functional.embedding(ids, group.weights[t]).float())
        return torch.cat(outs, dim=1 if self.pooled else 0)

    @torch.no_grad()
    def apply_update(
        self, lin: torch.Tensor, src: torch.Tensor, sample: torch.Tensor | None, batch: int, grad_output: torch.Tensor
    ) -> None:
        """The fused MBA step of every table of the group for one batch of `batch` samples (see
        embedding.mba); with online counts (`sample` given), n_j first counts this batch."""
        self._step += 1
        rule = mba.Rule(self.rule, self._lr, step=self._step, **self._hyper)
        self._update(self._group().layout, lin, src, grad_output, rule, self.params.lam, sample, batch)


def _strip_mba(config):
    """The group config without our key, for torchrec/FBGEMM constructors that pass fused_params on;
    our key; and the optimizer whose states our module keeps (None: FBGEMM's module keeps them),
    which FBGEMM's module is then built without (as EXACT_SGD, the holder of the weights)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    fp = dict(config.fused_params or {})
    params = fp.pop(MBA_KEY)
    own = {EmbOptimType.ADAM: "adam", EmbOptimType.PARTIAL_ROWWISE_ADAM: "partial_rowwise_adam"}
    rule = own.get(fp.get("optimizer"))
    if rule is not None:
        fp["optimizer"] = EmbOptimType.EXACT_SGD
    return dataclasses.replace(config, fused_params=fp), params, rule


def _make_kernel_classes():
    from torchrec.distributed.batched_embedding_kernel import (
        BatchedFusedEmbedding,
        BatchedFusedEmbeddingBag,
        EmbeddingFusedOptimizer,
    )

    class MBAFusedEmbeddingBag(BatchedFusedEmbeddingBag):
        """torchrec's fused pooled kernel with the MBA optimizer (see module docstring)."""

        def __init__(self, config, pg=None, device=None, sharding_type=None, env=None) -> None:
            config, params, rule = _strip_mba(config)
            super().__init__(config, pg, device, sharding_type, env)
            self._emb_module = MBATableBatchedEmbedding(self._emb_module, params, pooled=True, rule=rule)
            self._optim = EmbeddingFusedOptimizer(config, self._emb_module, pg)

    class MBAFusedEmbedding(BatchedFusedEmbedding):
        """torchrec's fused sequence kernel with the MBA optimizer (see module docstring)."""

        def __init__(self, config, pg=None, device=None) -> None:
            config, params, rule = _strip_mba(config)
            super().__init__(config, pg, device)
            self._emb_module = MBATableBatchedEmbedding(self._emb_module, params, pooled=False, rule=rule)
            self._optim = EmbeddingFusedOptimizer(config, self._emb_module, pg)

    return MBAFusedEmbeddingBag, MBAFusedEmbedding


@functools.cache
def install() -> tuple[type, type]:
    """Route FUSED table groups with `mba` fused_params to our kernels (idempotent)."""
    from torchrec.distributed import embedding_lookup as el
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    bag_cls, seq_cls = _make_kernel_classes()

    def route(config, device) -> tuple[bool, Any]:
        """(our kernel?, the config for it or for torchrec's): ours for a FUSED group with our
        key, unless the key is `plain` and the tables are on a GPU, where FBGEMM's kernels (its
        Adam included) are the ones to use; torchrec's kernel then gets the config without the key."""
        fp = config.fused_params or {}
        if config.compute_kernel != EmbeddingComputeKernel.FUSED or MBA_KEY not in fp:
            return False, config
        if fp[MBA_KEY].plain and device is not None and torch.device(device).type == "cuda":
            return False, dataclasses.replace(config, fused_params={k: v for k, v in fp.items() if k != MBA_KEY})
        return True, config

    pooled_factory = el.GroupedPooledEmbeddingsLookup._create_embedding_kernel
    seq_factory = el.GroupedEmbeddingsLookup._create_embedding_kernel

    def pooled_kernel(self, config, device, pg, sharding_type, env=None):
        ours, config = route(config, device)
        if ours:
            return bag_cls(config=config, pg=pg, device=device, sharding_type=sharding_type, env=env)
        return pooled_factory(self, config, device, pg, sharding_type, env)

    def seq_kernel(self, config, pg, device, env=None):
        ours, config = route(config, device)
        if ours:
            return seq_cls(config=config, pg=pg, device=device)
        return seq_factory(self, config, pg, device, env)

    el.GroupedPooledEmbeddingsLookup._create_embedding_kernel = pooled_kernel
    el.GroupedEmbeddingsLookup._create_embedding_kernel = seq_kernel
    return bag_cls, seq_cls


def mba_modules(model: nn.Module) -> list[tuple[Any, MBATableBatchedEmbedding]]:
    """(torchrec kernel, its MBA module) for every MBA kernel in a sharded model (torchrec keeps
    a sharded collection's lookups in a plain list, outside `modules()`)."""
    found, seen = [], set()
    for m in model.modules():
        for lookup in getattr(m, "_lookups", None) or []:
            for k in lookup.modules():
                if isinstance(getattr(k, "_emb_module", None), MBATableBatchedEmbedding) and id(k) not in seen:
                    seen.add(id(k))
                    found.append((k, k._emb_module))
    return found
