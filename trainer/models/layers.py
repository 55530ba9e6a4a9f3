"""Building blocks of the DIN paper (§4–§5): Dice, PReLU, MLP, the local activation unit, and the
sparse front end that looks features up in torchrec embedding modules.

Shape legend: B batch, N behaviours in the batch (sum of history lengths), D width of one
behaviour (its features' embeddings concatenated), P pooled width, F dense features, H hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.layout import FeatureLayout, jagged_rows
from embedding.tables import embedding_bag_configs, embedding_configs
from trainer.models.activations import PReLU, activation
from trainer.models.attention import bf16_pairs, fused_unit
from trainer.models.jagged import gather_rows, segment_sum


class MLP(nn.Sequential):
    """Linear → activation for each hidden size; `out` > 0 adds a final Linear to `out` units."""

    def __init__(self, in_dim: int, hidden: list[int], act: str, out: int = 0):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), activation(act, h)]
            in_dim = h
        if out:
            layers.append(nn.Linear(in_dim, out))
        super().__init__(*layers)


BF16_ROWS = 256  # jagged row counts rounded up to this under bf16 autocast on the CPU


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over jagged rows [N, I]. Under bf16 autocast on the CPU the rows are zero-padded
    to a multiple of BF16_ROWS and the padding cut off again: a bf16 GEMM there costs about 6 ms
    for each shape it has not seen (fp32 does not), and N, the batch's behaviours, is new in
    almost every batch. Padded rows get no gradient (they are cut off) and enter no statistic."""
    if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    n = x.shape[0]
    pad = -n % BF16_ROWS
    return F.linear(F.pad(x, (0, 0, 0, pad)), weight, bias)[:n]


class LocalActivationUnit(nn.Module):
    """DIN's attention, Eq. 3 and Fig. 2: v_U(A) = Σ_j a(e_j, v_A)·e_j, with
    a(e_j, v_A) = MLP([e_j, v_A, e_j − v_A, e_j ⊙ v_A]) a scalar, *not* softmax-normalised.

    Works on the jagged behaviours directly: padded positions never exist, so they can neither
    receive weight nor enter Dice's batch statistics.

    The MLP's first layer W·[e, v, e − v, e ⊙ v] + b is computed as
    [e, e ⊙ v]·[W1 + W3, W4]ᵀ per behaviour plus (v·(W2 − W3)ᵀ + b) per row, gathered: the
    same function and parameters, with half the per-behaviour matmul and no [N, 4D] input.

    `kernel`: "fused", the unit with PReLU on the CPU as one op (trainer.models.attention: blocks
    of histories through every layer while in cache); "layers", layer by layer as written here;
    "auto", fused where it applies (PReLU, the CPU), under bf16 autocast only where the kernel runs
    bf16 products as AVX512-BF16 pair products (its bf16 blocks on MKL were slower than the layers;
    docs/results.md, "CPU speed").
    """

    def __init__(self, dim: int, hidden: list[int], act: str, kernel: str = "auto"):
        super().__init__()
        if kernel not in ("auto", "fused", "layers"):
            raise ValueError(f"attention kernel must be 'auto', 'fused' or 'layers', got {kernel!r}")
        if kernel == "fused" and act != "prelu":
            raise ValueError(f"the fused attention kernel takes PReLU, not {act!r}")
        self.dim = dim
        self.kernel = kernel
        self.mlp = MLP(4 * dim, hidden, act, out=1)

    def _fused(self, hist: torch.Tensor) -> bool:
        if self.kernel == "layers":
            return False
        acts = list(self.mlp)[1:-1:2]
        applies = (
            hist.device.type == "cpu"
            and hist.dtype in (torch.float32, torch.float64)
            and all(isinstance(a, PReLU) and a.use_kernel for a in acts)
        )
        if self.kernel == "fused":
            if not applies:
                raise ValueError(f"the fused attention kernel runs on the CPU, the behaviours are on {hist.device}")
            return True
        return applies and (not torch.is_autocast_enabled("cpu") or bf16_pairs())

    def _weights(self, hist: torch.Tensor, cand: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        first = self.mlp[0]
        w_e, w_v, w_diff, w_prod = first.weight.split(self.dim, dim=1)  # each [H, D]
        per_row = F.linear(cand, w_v - w_diff, first.bias)  # [B, H]
        per_behaviour = torch.cat([hist, hist * gather_rows(cand, seg)], dim=1)  # [N, 2D]
        z = rows_linear(per_behaviour, torch.cat([w_e + w_diff, w_prod], dim=1)) + gather_rows(per_row, seg)
        for layer in list(self.mlp)[1:]:
            z = rows_linear(z, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(z)
        return z

    def weights(self, hist: torch.Tensor, cand: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """a(e_j, v_A) of every behaviour: hist [N, D], cand [B, D], lengths [B] -> [N, 1]."""
        return self._weights(hist, cand, jagged_rows(lengths, hist.shape[0]))

    def forward(self, hist: torch.Tensor, cand: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # hist [N, D], cand [B, D], lengths [B] -> [B, D]
        if self._fused(hist):
            bf16 = torch.is_autocast_enabled("cpu") and hist.dtype == torch.float32
            return fused_unit(self, hist, cand, lengths, bf16)
        seg = jagged_rows(lengths, hist.shape[0])
        return segment_sum(self._weights(hist, cand, seg) * hist, seg, cand.shape[0])


class Lookups(NamedTuple):
    cand: torch.Tensor  # [B, D] candidate
    hist: torch.Tensor | None  # [N, D] behaviours, jagged (None with history_pooled)
    lengths: torch.Tensor | None  # [B] behaviours per row (None with history_pooled)
    pooled: torch.Tensor  # [B, P] the other pooled features
    neg: torch.Tensor | None  # [N, D] DIEN's negative behaviours, aligned with hist (or None)
    hist_sum: torch.Tensor | None = None  # [B, D] the behaviours summed by the lookup (history_pooled)


class SparseArch(nn.Module):
    """KJTs → candidate, behaviours and pooled embeddings, through torchrec modules only, so that
    DistributedModelParallel can shard them unchanged. With `layout.history_pooled` every table is
    in the EmbeddingBagCollection: the candidate is a bag of one id, each history a bag summed by
    FBGEMM (`Lookups.hist_sum`), and there is no EmbeddingCollection.
    """

    def __init__(self, layout: FeatureLayout, device: torch.device | None = None):
        super().__init__()
        self.layout = layout
        self.ec = EmbeddingCollection(tables=embedding_configs(layout), device=device) if layout.seq_tables else None
        self.ebc = (
            EmbeddingBagCollection(tables=embedding_bag_configs(layout), device=device)
            if layout.pooled_tables
            else None
        )

    def forward(self, seq: KeyedJaggedTensor, pooled_kjt: KeyedJaggedTensor | None) -> Lookups:
        # seq: the candidate and behaviour features; pooled_kjt: the pooled ones (Batch.pooled)
        layout = self.layout
        if layout.history_pooled:
            kt = self.ebc(pooled_kjt).to_dict()
            cand = torch.cat([kt[c] for c, _ in layout.pairs], dim=1)
            hist_sum = torch.cat([kt[h] for _, h in layout.pairs], dim=1)
            others = [kt[f] for f in layout.other_pooled_features]
            pooled = torch.cat(others, dim=1) if others else cand.new_zeros(cand.shape[0], 0)
            return Lookups(cand, None, None, pooled, None, hist_sum)
        pooled = None
        if self.ebc is not None:  # by name: a sharded collection orders its outputs by shard, not config
            kt = self.ebc(pooled_kjt).to_dict()
            pooled = torch.cat([kt[f] for f in layout.other_pooled_features], dim=1)
        jts = self.ec(seq)
        cand = torch.cat([jts[c].values() for c, _ in layout.pairs], dim=1)
        hist = torch.cat([jts[h].values() for _, h in layout.pairs], dim=1)
        lengths = jts[layout.pairs[0][1]].lengths()
        neg = torch.cat([jts[n].values() for _, n in layout.negatives], dim=1) if layout.negatives else None
        if pooled is None:
            pooled = cand.new_zeros(cand.shape[0], 0)
        return Lookups(cand, hist, lengths, pooled, neg)


def resolved_precision(precision: str, device: torch.device) -> str:
    """model.precision on `device`: "auto" is bf16 on a CPU with AVX512-BF16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and torch.cpu._is_avx512_bf16_supported() else "fp32"


class Tower(nn.Module):
    """The dense part of a model: `compute(lookups, dense)` -> logits [B] (or (logits, training
    term)). With precision "bf16" (or "auto" on a CPU with AVX512-BF16) it runs under bfloat16
    autocast (matmuls in bf16, weights, statistics and outputs in fp32), the mixed precision of
    GPU training, on the CPU too.
    With `compile` the forward (and so its backward) goes through torch.compile with dynamic
    shapes: one graph for every batch size and history total, one more for evaluation."""

    def __init__(self, precision: str = "fp32", compile: bool = False):
        super().__init__()
        self.precision = precision
        self.compiled = compile

    def compute(self, x: Lookups, dense: torch.Tensor):
        raise NotImplementedError

    def _run(self, x: Lookups, dense: torch.Tensor, bf16: bool):
        if not bf16:
            return self.compute(x, dense)
        with torch.autocast(dense.device.type, dtype=torch.bfloat16):
            out = self.compute(x, dense)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def forward(self, x: Lookups, dense: torch.Tensor):
        bf16 = resolved_precision(self.precision, dense.device) == "bf16"
        if not self.compiled:
            return self._run(x, dense, bf16)
        fn = self.__dict__.get("_compiled")  # not a module attribute: state_dict and copies skip it
        if fn is None:
            fn = self.__dict__["_compiled"] = torch.compile(self._run, dynamic=True)
        return fn(x, dense, bf16)


class CTRModel(nn.Module):
    """A model of the zoo: the sparse front end (`sparse`, the torchrec modules that
    DistributedModelParallel shards) and the model's own dense part (`tower`, which holds no
    sharded module).

    The split is what torchrec's TrainPipelineSparseDist needs (trainer.step): it traces this
    forward with FX, with every module that holds no sharded module as a leaf, and pipelines the
    embedding modules whose inputs are plain attributes of the batch (`batch.sparse`,
    `batch.pooled`). The tower, a leaf, may use data-dependent shapes and Python control flow
    (DIEN's time loop, Dice's batch statistics)."""

    def __init__(self, layout: FeatureLayout, tower: nn.Module, device: torch.device | None = None):
        super().__init__()
        self.sparse = SparseArch(layout, device)
        self.tower = tower

    def lookups(self, batch) -> Lookups:
        return self.sparse(batch.sparse, batch.pooled)

    def forward(self, batch):  # -> logits [B], or (logits, training term) (DIEN)
        return self.tower(self.lookups(batch), batch.dense)

    def attention_weights(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's attention weight of every behaviour, [N] (jagged), and the lengths [B]."""
        return self.tower.attention_weights(self.lookups(batch))
