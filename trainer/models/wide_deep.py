"""Wide&Deep (Cheng et al. 2016; the DIN paper's Table 3 baseline): logit = wide + deep, the
wide part a linear model over every field (trainer.models.lr.LinearPart, the fields as
DeepCTR-Torch's WDL has them: no hand-made cross features) and the deep part BaseModel's MLP
over the same fields concatenated.
"""

from __future__ import annotations

import torch

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import flat
from trainer.models.layers import MLP, CTRModel, Lookups, Tower
from trainer.models.lr import LinearPart, sparse_width


class WideDeepTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        self.wide = LinearPart(layout, n_dense)
        self.deep = MLP(sparse_width(layout) + n_dense, cfg.mlp, cfg.activation, out=1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        x0 = flat(x, dense, self.layout)
        return self.wide(x0) + self.deep(x0).squeeze(1)


class WideDeep(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, WideDeepTower(layout, cfg, n_dense), device)
