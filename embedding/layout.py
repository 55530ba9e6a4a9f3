"""The feature layout of a batch: which feature is a candidate, a behaviour or a DIEN negative,
which table each one looks up, and the KJT key order. The one place of the naming rule:

- `hist_X` is the behaviour feature of candidate feature `X` (a list of ids, oldest first); a
  table that holds both is a *sequence* table, looked up unpooled (EmbeddingCollection) for the
  candidate and the history alike, so that they share one table as in the papers;
- `neg_hist_X` is DIEN's negative of behaviour `hist_X` (aligned with it, one per behaviour): it
  joins the table of `hist_X` by itself when the model has an auxiliary loss, read from the file
  when the file has the column, else sampled by the reader;
- every other feature is pooled (sum, EmbeddingBagCollection);
- a model that does not look at the behaviours one by one (BaseModel and the other baselines:
  every model but those of SEQUENCE_MODELS) has its behaviour tables pooled too
  (`history_pooled`): FBGEMM sums each history inside the lookup and its backward, with no
  [N, D] tensor of behaviours (5× less time than the unpooled lookup and backward at batch 1024
  on the CPU, docs/results.md);
- `data.profile` and `data.context` label some of the other features (sparse or dense) as the
  user-profile and context groups (MIAN §3.1); `fields` gives a model each feature's own slice.

Also `jagged_rows`, the row of each value of a jagged tensor, which every layer that works on the
jagged behaviours needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.config import Config, TableConfig

HISTORY = "hist_"
NEGATIVE = "neg_"
# models that attend over the behaviours one by one (looked up unpooled); the others sum them
SEQUENCE_MODELS = ("din", "dien", "mian")


def behaviour_of(candidate: str) -> str:
    """The behaviour feature of a candidate feature: item_id -> hist_item_id."""
    return HISTORY + candidate


def candidate_of(feature: str) -> str | None:
    """The candidate feature of a behaviour feature (hist_item_id -> item_id), else None."""
    return feature.removeprefix(HISTORY) if feature.startswith(HISTORY) else None


def negative_of(behaviour: str) -> str:
    """DIEN's negative of a behaviour feature: hist_item_id -> neg_hist_item_id."""
    return NEGATIVE + behaviour


def is_negative(feature: str) -> bool:
    return feature.startswith(NEGATIVE)


def is_sequence(feature: str) -> bool:
    """A behaviour or a negative: one id per behaviour of the row, not one per row."""
    return feature.startswith((HISTORY, NEGATIVE + HISTORY))


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
    max_hist_len: int = 0  # behaviours per row at most (data.max_hist_len; 0: not known)
    history_pooled: bool = False  # the behaviour tables sum-pooled too (the models not in SEQUENCE_MODELS)
    dense: tuple[str, ...] = ()  # the dense features, the columns of Batch.dense
    profile: tuple[str, ...] = ()  # user-profile features (sparse or dense), data.profile order
    context: tuple[str, ...] = ()  # context features (sparse or dense), data.context order

    @staticmethod
    def from_config(cfg: Config) -> FeatureLayout:
        with_negatives = cfg.model.name == "dien" and cfg.model.aux_loss > 0
        history_pooled = cfg.model.name not in SEQUENCE_MODELS
        seq, pooled, pairs, negatives = [], [], [], []
        for t in cfg.tables:
            tp = [(c, f) for f in t.features if (c := candidate_of(f)) is not None and c in t.features]
            if tp and with_negatives:
                tn = [(h, negative_of(h)) for _, h in tp]
                t = dataclasses.replace(t, features=[*t.features, *(n for _, n in tn)])
                negatives.extend(tn)
            (seq if tp and not history_pooled else pooled).append(t)
            pairs.extend(tp)
        return FeatureLayout(
            tuple(seq),
            tuple(pooled),
            tuple(pairs),
            tuple(negatives),
            cfg.data.max_hist_len,
            history_pooled,
            tuple(cfg.data.dense_features),
            tuple(cfg.data.profile),
            tuple(cfg.data.context),
        )

    @property
    def tables(self) -> tuple[TableConfig, ...]:
        return self.seq_tables + self.pooled_tables

    @property
    def seq_features(self) -> list[str]:
        return [f for t in self.seq_tables for f in t.features]

    @property
    def pooled_features(self) -> list[str]:
        return [f for t in self.pooled_tables for f in t.features]

    @property
    def other_pooled_features(self) -> list[str]:
        """The pooled features that are neither a candidate nor a behaviour (with
        `history_pooled` those are pooled too)."""
        paired = {f for pair in self.pairs for f in pair}
        return [f for f in self.pooled_features if f not in paired]

    @property
    def keys(self) -> list[str]:
        return self.seq_features + self.pooled_features

    @property
    def behaviour_keys(self) -> list[str]:
        """Every feature with one id per behaviour (the behaviours and their negatives), KJT order:
        what must stay aligned when behaviours are dropped or reordered."""
        return [k for k in self.keys if is_sequence(k)]

    @property
    def behaviour_dim(self) -> int:
        """Width of one behaviour (and of the candidate): its pairs' embeddings concatenated."""
        return sum(self.table_of(c).dim for c, _ in self.pairs)

    @property
    def pooled_dim(self) -> int:
        """Width of the other pooled features' embeddings concatenated."""
        return sum(self.table_of(f).dim for f in self.other_pooled_features)

    @property
    def candidate_dims(self) -> list[int]:
        """The width of each candidate feature (pair order): how Lookups.cand and a behaviour split."""
        return [self.table_of(c).dim for c, _ in self.pairs]

    # plain properties, not functools.cached_property: that takes a lock on Python 3.11, which
    # torch.compile cannot trace (a graph break in every tower that reads them)
    @property
    def pooled_dims(self) -> list[int]:
        """The width of each other pooled feature (other_pooled_features order): how Lookups.pooled splits."""
        return [self.table_of(f).dim for f in self.other_pooled_features]

    @property
    def _fields(self) -> dict[str, tuple[str, int, int]]:
        out, start = {}, 0
        for f, d in zip(self.other_pooled_features, self.pooled_dims, strict=True):
            out[f], start = ("pooled", start, start + d), start + d
        out.update({f: ("dense", i, i + 1) for i, f in enumerate(self.dense)})
        return out

    def field(self, feature: str) -> tuple[str, int, int]:
        """Where a non-candidate feature's values are in a batch's lookups: ("pooled", start, end),
        its columns of Lookups.pooled (an embedding), or ("dense", i, i + 1), its column of the
        dense features (a scalar)."""
        return self._fields[feature]

    def table_of(self, feature: str) -> TableConfig:
        for t in self.tables:
            if feature in t.features:
                return t
        raise KeyError(feature)
