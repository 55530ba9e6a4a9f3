"""xDeepFM (Lian et al. 2018; MIAN's Table 2 baseline): logit = linear + CIN + deep.

The Compressed Interaction Network (the paper's Eq. 6), on the fields X⁰ [B, m, D]:

    X^k_h = Σ_i Σ_j W^{k,h}_{ij} (X^{k−1}_i ∘ X⁰_j),  h = 1 … H_k   (a 1×1 convolution over the
                                                                    H_{k−1}·m outer products)
    p^k_h = Σ_d X^k_{h,d}  (sum pooling);  CIN logit = wᵀ [p¹, …, p^K]

with the identity activation, as in the paper. The linear part is trainer.models.lr.LinearPart,
the deep part an MLP on the fields and dense features. All fields need one width (config check).
"""

from __future__ import annotations

import torch
from torch import nn

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import n_sparse_fields, sparse_fields
from trainer.models.layers import MLP, CTRModel, Lookups, Tower
from trainer.models.lr import LinearPart, sparse_width


class CIN(nn.Module):
    def __init__(self, fields: int, layers: list[int]):
        super().__init__()
        self.convs = nn.ModuleList()
        prev = fields
        for h in layers:
            self.convs.append(nn.Conv1d(prev * fields, h, kernel_size=1))
            prev = h
        self.out = nn.Linear(sum(layers), 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # [B, m, D] -> [B]
        b, m, d = x0.shape
        xk, pooled = x0, []
        for conv in self.convs:
            z = (xk.unsqueeze(2) * x0.unsqueeze(1)).reshape(b, xk.shape[1] * m, d)  # [B, H·m, D]
            xk = conv(z)  # [B, H_k, D]
            pooled.append(xk.sum(dim=2))
        return self.out(torch.cat(pooled, dim=1)).squeeze(1)


class XDeepFMTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        self.linear = LinearPart(layout, n_dense)
        self.cin = CIN(n_sparse_fields(layout), cfg.cin_layers)
        self.deep = MLP(sparse_width(layout) + n_dense, cfg.mlp, cfg.activation, out=1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        fields = sparse_fields(x, self.layout)
        x0 = torch.cat([*fields, dense], dim=1)  # trainer.models.fields.flat, from the fields at hand
        return self.linear(x0) + self.cin(torch.stack(fields, dim=1)) + self.deep(x0).squeeze(1)


class XDeepFM(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, XDeepFMTower(layout, cfg, n_dense), device)
