"""Product-based Neural Network, the inner-product variant (IPNN, Qu et al. 2016; the DIN
paper's Table 3 baseline): the product layer puts the inner product of every pair of fields,
⟨f_i, f_j⟩ for i < j, beside the fields themselves (the linear signals), and an MLP reads both
(with the dense features). All fields need one width (config check).
"""

from __future__ import annotations

import torch

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import n_sparse_fields, sparse_fields
from trainer.models.layers import MLP, CTRModel, Lookups, Tower
from trainer.models.lr import sparse_width


def pairwise_inner(fields: torch.Tensor) -> torch.Tensor:
    """fields [B, F, k] -> [B, F(F−1)/2], ⟨f_i, f_j⟩ for i < j in row-major order."""
    n = fields.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=fields.device)
    return torch.bmm(fields, fields.transpose(1, 2))[:, i, j]


class PNNTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        f = n_sparse_fields(layout)
        self.mlp = MLP(sparse_width(layout) + n_dense + f * (f - 1) // 2, cfg.mlp, cfg.activation, out=1)

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        fields = sparse_fields(x, self.layout)
        products = pairwise_inner(torch.stack(fields, dim=1))
        return self.mlp(torch.cat([*fields, products, dense], dim=1)).squeeze(1)


class PNN(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, PNNTower(layout, cfg, n_dense), device)
