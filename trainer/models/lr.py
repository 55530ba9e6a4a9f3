"""Logistic regression (the DIN paper's Table 3 LR, MIAN's Table 2): logit = b + Σ_f w_f(x_f).

FBGEMM's tables are at least 4 wide (dims are multiples of 4), so a feature's weight is a linear
read-out of its embedding, w_f(id) = ⟨u_f, e_id⟩: any per-id weight can be learnt this way
(the embedding rows are free), so the model is LR over the ids, with the dense features as
further linear inputs. The history is one field, the sum of its behaviours' weights.
"""

from __future__ import annotations

import torch
from torch import nn

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import flat
from trainer.models.layers import CTRModel, Lookups, Tower


def sparse_width(layout: FeatureLayout) -> int:
    """The width of every sparse field concatenated: candidate, summed history, other pooled."""
    return 2 * layout.behaviour_dim + layout.pooled_dim


class LinearPart(nn.Module):
    """Σ_f w_f(x_f) + b over every field and dense feature: [B] (LR, and the wide or first-order
    part of Wide&Deep, DeepFM and xDeepFM), on trainer.models.fields.flat's [B, Σ d + F]."""

    def __init__(self, layout: FeatureLayout, n_dense: int):
        super().__init__()
        self.linear = nn.Linear(sparse_width(layout) + n_dense, 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.linear(x0).squeeze(1)


class LRTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        self.linear = LinearPart(layout, n_dense)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        return self.linear(flat(x, dense, self.layout))


class LR(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, LRTower(layout, cfg, n_dense), device)
