"""Table specs -> torchrec configs, the feature layout of a batch, and id -> row mapping.

A table whose features include a candidate/behaviour pair (`X` and `hist_X`) is a *sequence*
table: it is looked up unpooled through an EmbeddingCollection, candidate and history alike, so
that the candidate item and the behaviour items share one table as in the papers. Every other
table is *pooled* (sum) through an EmbeddingBagCollection.

DIEN with an auxiliary loss also looks up a negative behaviour for every behaviour: the feature
`neg_hist_X` joins the table of `hist_X` (read from the file when it has the column, else sampled
by the reader), so negatives share the behaviours' rows as the paper's Eq. 6 wants.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, EmbeddingConfig

from trainer.config import Config, TableConfig


def jagged_rows(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """The row of each of the n values of a jagged tensor: lengths [R] -> [n], n = sum(lengths)
    (a behaviour's batch row, a lookup's bag)."""
    rows = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(rows, lengths, output_size=n)


@dataclass(frozen=True)
class FeatureLayout:
    """Which feature goes where; the KJT of a batch holds `keys` in this order."""

    seq_tables: tuple[TableConfig, ...]
    pooled_tables: tuple[TableConfig, ...]
    pairs: tuple[tuple[str, str], ...]  # (candidate feature, behaviour feature), table order
    negatives: tuple[tuple[str, str], ...] = ()  # (behaviour feature, its negative), pair order

    @staticmethod
    def from_config(cfg: Config) -> FeatureLayout:
        with_negatives = cfg.model.name == "dien" and cfg.model.aux_loss > 0
        seq, pooled, pairs, negatives = [], [], [], []
        for t in cfg.tables:
            tp = [(f[5:], f) for f in t.features if f.startswith("hist_") and f[5:] in t.features]
            if tp and with_negatives:
                tn = [(h, "neg_" + h) for _, h in tp]
                t = dataclasses.replace(t, features=[*t.features, *(n for _, n in tn)])
                negatives.extend(tn)
            (seq if tp else pooled).append(t)
            pairs.extend(tp)
        return FeatureLayout(tuple(seq), tuple(pooled), tuple(pairs), tuple(negatives))

    @property
    def seq_features(self) -> list[str]:
        return [f for t in self.seq_tables for f in t.features]

    @property
    def pooled_features(self) -> list[str]:
        return [f for t in self.pooled_tables for f in t.features]

    @property
    def keys(self) -> list[str]:
        return self.seq_features + self.pooled_features

    @property
    def seq_dim(self) -> int:
        return self.seq_tables[0].dim if self.seq_tables else 0

    @property
    def behaviour_dim(self) -> int:
        """Width of one behaviour (and of the candidate): its pairs' embeddings concatenated."""
        return self.seq_dim * len(self.pairs)

    @property
    def pooled_dim(self) -> int:
        return sum(t.dim * len(t.features) for t in self.pooled_tables)

    def table_of(self, feature: str) -> TableConfig:
        for t in self.seq_tables + self.pooled_tables:
            if feature in t.features:
                return t
        raise KeyError(feature)

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return [
            EmbeddingConfig(
                name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows, feature_names=list(t.features)
            )
            for t in self.seq_tables
        ]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(
                name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows, feature_names=list(t.features)
            )
            for t in self.pooled_tables
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
