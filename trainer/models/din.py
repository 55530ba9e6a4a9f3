"""Deep Interest Network, DIN paper §4.3 (Fig. 2, right): BaseModel with the sum pooling of the
history replaced by the local activation unit, so the user vector v_U(A) depends on the candidate.
"""

from __future__ import annotations

import torch

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.layers import MLP, CTRModel, LocalActivationUnit, Lookups, Tower


class DINTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        d = layout.behaviour_dim
        self.attention = LocalActivationUnit(d, cfg.attention_mlp, cfg.activation, cfg.attention_kernel)
        self.mlp = MLP(2 * d + layout.pooled_dim + n_dense, cfg.mlp, cfg.activation, out=1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:  # -> logits [B]
        user = self.attention(x.hist, x.cand, x.lengths)  # v_U(A), Eq. 3: [B, D]
        return self.mlp(torch.cat([x.cand, user, x.pooled, dense], dim=1)).squeeze(1)

    def attention_weights(self, x: Lookups) -> tuple[torch.Tensor, torch.Tensor]:
        """The local activation unit's weight of every behaviour, [N], and the lengths [B]."""
        return self.attention.weights(x.hist, x.cand, x.lengths).squeeze(1), x.lengths


class DIN(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, DINTower(layout, cfg, n_dense), device)
