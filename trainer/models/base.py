"""BaseModel (Embedding&MLP), DIN paper §4.2: history sum-pooled (Eq. 1), everything concatenated,
then an MLP to one click logit.
"""

from __future__ import annotations

import torch

from embedding.layout import FeatureLayout, jagged_rows
from trainer.config import ModelConfig
from trainer.models.jagged import segment_sum
from trainer.models.layers import MLP, CTRModel, Lookups, Tower


def sum_pool(hist: torch.Tensor, lengths: torch.Tensor, batch: int) -> torch.Tensor:
    """Eq. 1 with sum pooling: hist [N, D], lengths [B] -> [B, D]."""
    return segment_sum(hist, jagged_rows(lengths, hist.shape[0]), batch)


class BaseTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        d = layout.behaviour_dim
        self.mlp = MLP(2 * d + layout.pooled_dim + n_dense, cfg.mlp, cfg.activation, out=1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:  # -> logits [B]
        # [B, D]: summed by the lookup (layout.history_pooled, the layout of this model), or here
        user = x.hist_sum if x.hist_sum is not None else sum_pool(x.hist, x.lengths, x.cand.shape[0])
        return self.mlp(torch.cat([x.cand, user, x.pooled, dense], dim=1)).squeeze(1)


class BaseModel(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, BaseTower(layout, cfg, n_dense), device)
