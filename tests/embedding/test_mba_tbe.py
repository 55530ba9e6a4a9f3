"""The MBA module's own lookup and, at λ = 0, its update, against FBGEMM's table-batched module on
the same weights and batch (FBGEMM's forward and its fused EXACT_SGD), for the table groups that
torchrec hands it: several features over several tables, tables of one dim (one lookup over the
group's rows) and of several dims (a lookup per feature), pooled and sequence, with empty bags."""

import numpy as np
import pytest
import torch

from embedding.mba_tbe import MBAParams, MBATableBatchedEmbedding
from tests.conftest import CUDA

LR = 0.2


def fbgemm(rows_dims, feature_table, pooled, device):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device == "cuda"
    specs = [
        (
            r,
            d,
            EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
            ComputeDevice.CUDA if cuda else ComputeDevice.CPU,
        )
        for r, d in rows_dims
    ]
    return SplitTableBatchedEmbeddingBagsCodegen(
        specs,
        feature_table_map=feature_table,
        optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=LR,
        pooling_mode=PoolingMode.SUM if pooled else PoolingMode.NONE,
        device=torch.device(device),
    )


GROUPS = {  # rows_dims, feature → table, pooled
    "pooled-one-dim": ([(30, 8), (20, 8)], [0, 1, 0], True),
    "pooled-two-dims": ([(30, 8), (20, 4)], [0, 1, 0], True),
    "sequence-two-tables": ([(30, 8), (20, 8)], [0, 1, 1], False),
}


@pytest.mark.parametrize(
    "device,kernel", [("cpu", "cpp"), ("cpu", "triton"), pytest.param("cuda", "triton", marks=CUDA)]
)
@pytest.mark.parametrize("group", GROUPS)
def test_lookup_and_lambda_zero_step_equal_fbgemm(group, device, kernel):
    rows_dims, feature_table, pooled = GROUPS[group]
    rng = np.random.default_rng(6)
    ref, inner = fbgemm(rows_dims, feature_table, pooled, device), fbgemm(rows_dims, feature_table, pooled, device)
    for a, b in zip(ref.split_embedding_weights(), inner.split_embedding_weights(), strict=True):
        a.copy_(torch.tensor(rng.standard_normal(a.shape), dtype=torch.float32, device=device))
        b.copy_(a)
    mba = MBATableBatchedEmbedding(inner, MBAParams(lam=0.0, counts="static", kernel=kernel), pooled=pooled)
    if group == "pooled-one-dim":
        assert mba._group().flat is not None  # the single-lookup path
    if group == "pooled-two-dims":
        assert mba._group().flat is None  # the per-feature path
    before = [w.clone() for w in ref.split_embedding_weights()]
    batch = 5
    for _ in range(2):
        lengths = rng.integers(0, 4, batch * len(feature_table))
        lengths[[0, 4, -1]] = 0
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), device=device)
        indices = torch.tensor(
            np.concatenate(
                [rng.integers(0, rows_dims[feature_table[b // batch]][0], n) for b, n in enumerate(lengths)]
            ),
            dtype=torch.int64,
            device=device,
        )
        with torch.no_grad():
            torch.testing.assert_close(mba(indices, offsets), ref(indices, offsets), rtol=1e-6, atol=1e-6)
        out_ref, out = ref(indices, offsets), mba(indices, offsets)
        torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
        grad = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float32, device=device)
        out_ref.backward(grad)
        out.backward(grad)
        for a, b in zip(ref.split_embedding_weights(), inner.split_embedding_weights(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert all(not torch.equal(w, w0) for w, w0 in zip(ref.split_embedding_weights(), before, strict=True))
