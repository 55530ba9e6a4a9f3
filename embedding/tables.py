"""Embedding tables: a layout's tables as torchrec configs, the id -> row maps, and the initial
rows of any shard.

The feature layout (which feature is a candidate, a behaviour or a negative, and which table
each looks up) is embedding.layout.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, EmbeddingConfig

from embedding.layout import FeatureLayout
from trainer.config import TableConfig


def embedding_configs(layout: FeatureLayout) -> list[EmbeddingConfig]:
    """The sequence tables (candidate and behaviours, unpooled) for an EmbeddingCollection."""
    return [
        EmbeddingConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows, feature_names=list(t.features))
        for t in layout.seq_tables
    ]


def embedding_bag_configs(layout: FeatureLayout) -> list[EmbeddingBagConfig]:
    """The pooled tables (sum) for an EmbeddingBagCollection."""
    return [
        EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows, feature_names=list(t.features))
        for t in layout.pooled_tables
    ]


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hash_ids(ids: np.ndarray, num_rows: int) -> np.ndarray:
    """A fixed 64-bit mix of each id (splitmix64 finalizer), modulo num_rows."""
    z = ids.astype(np.int64, copy=False).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(num_rows)).astype(np.int64)


INIT_BLOCK_ROWS = 1 << 16


def init_rows(table: TableConfig, seed: int, row_start: int, row_end: int) -> torch.Tensor:
    """Initial weights of rows [row_start, row_end) of `table`: uniform(±1/sqrt(num_rows)), as
    torchrec's default, drawn per block of 65,536 rows from a generator seeded by (seed, table
    name, block). Any shard of the table can be initialised alone and gets the same values as in
    any other sharding or world size.
    """
    bound = table.num_rows**-0.5
    blocks = []
    for block in range(row_start // INIT_BLOCK_ROWS, (row_end - 1) // INIT_BLOCK_ROWS + 1):
        first = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, table.num_rows - first)
        key = zlib.crc32(f"{seed}/{table.name}/{block}".encode())
        g = torch.Generator().manual_seed(key)
        w = torch.rand(rows, table.dim, generator=g) * (2 * bound) - bound
        lo, hi = max(row_start, first) - first, min(row_end, first + rows) - first
        blocks.append(w[lo:hi])
    return torch.cat(blocks) if blocks else torch.empty(0, table.dim)
