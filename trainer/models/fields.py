"""The fields of a batch, for the models that treat every feature as a field (the DIN paper's
baselines, §6.3, and MIAN's groups): each candidate feature, each behaviour feature summed over
the history (Eq. 1, the lookup's sum with `layout.history_pooled`), each other sparse feature's
pooled embedding, and the dense features.
"""

from __future__ import annotations

import torch

from embedding.layout import FeatureLayout
from trainer.models.base import sum_pool
from trainer.models.layers import Lookups


def history_sum(x: Lookups) -> torch.Tensor:
    """The behaviours summed per row, [B, D]: by the lookup (history_pooled) or here."""
    return x.hist_sum if x.hist_sum is not None else sum_pool(x.hist, x.lengths, x.cand.shape[0])


def sparse_fields(x: Lookups, layout: FeatureLayout) -> list[torch.Tensor]:
    """Every sparse feature as one field [B, d]: the candidate features (pair order), the summed
    behaviour features (pair order), then the other pooled features (layout order)."""
    dims = layout.candidate_dims
    fields = [*x.cand.split(dims, dim=1), *history_sum(x).split(dims, dim=1)]
    if layout.other_pooled_features:
        fields += x.pooled.split(layout.pooled_dims, dim=1)
    return fields


def flat(x: Lookups, dense: torch.Tensor, layout: FeatureLayout) -> torch.Tensor:
    """Every sparse field and the dense features side by side, [B, Σ d + F]: the input of the
    baselines' linear and deep parts."""
    return torch.cat([*sparse_fields(x, layout), dense], dim=1)


def n_sparse_fields(layout: FeatureLayout) -> int:
    return 2 * len(layout.pairs) + len(layout.other_pooled_features)


def group(x: Lookups, dense: torch.Tensor, layout: FeatureLayout, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The fields of a feature group (data.profile or data.context), in its order: a sparse
    feature's embedding [B, d], a dense feature's column [B, 1]."""
    out = []
    for name in names:
        where, start, end = layout.field(name)
        out.append((x.pooled if where == "pooled" else dense)[:, start:end])
    return out
