"""Deep & Cross Network (Wang et al. 2017; MIAN's Table 2 baseline), and DCN-v2 (Wang et al.
2021) with `model.cross: v2`. The fields and dense features concatenated, x_0 [B, N], go
through a cross network and an MLP side by side; one linear layer reads both outputs:

    v1: x_{l+1} = x_0 (x_lᵀ w_l) + b_l + x_l       (torchrec's VectorCrossNet)
    v2: x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l      (torchrec's CrossNet)
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, VectorCrossNet

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import flat
from trainer.models.layers import MLP, CTRModel, Lookups, Tower
from trainer.models.lr import sparse_width


class DCNTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        n = sparse_width(layout) + n_dense
        self.cross = (VectorCrossNet if cfg.cross == "v1" else CrossNet)(n, cfg.cross_layers)
        self.deep = MLP(n, cfg.mlp, cfg.activation)
        self.out = nn.Linear(n + (cfg.mlp[-1] if cfg.mlp else n), 1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        x0 = flat(x, dense, self.layout)
        return self.out(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(1)


class DCN(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, DCNTower(layout, cfg, n_dense), device)
