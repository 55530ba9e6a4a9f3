"""DeepFM (Guo et al. 2017; the DIN paper's Table 3 and MIAN's Table 2 baseline):
logit = first order + FM + deep, on one set of field embeddings:

    first order: Σ_f w_f(x_f) + b (trainer.models.lr.LinearPart, dense features included)
    FM:          Σ_{i<j} ⟨f_i, f_j⟩ = ½ Σ_k [(Σ_i f_ik)² − Σ_i f_ik²]
    deep:        an MLP on the fields and dense features concatenated (torchrec's DeepFM module)

All fields need one width (config check). The FM term is written here: torchrec's
FactorizationMachine flattens [B, N, D] to [B, N·D] and squares the sum over all N·D values, an FM
over scalars (every embedding coordinate a feature of its own), not DeepFM's over field vectors.
"""

from __future__ import annotations

import torch
from torchrec.modules.deepfm import DeepFM as DeepFMModule

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.fields import sparse_fields
from trainer.models.layers import MLP, CTRModel, Lookups, Tower
from trainer.models.lr import LinearPart, sparse_width


def fm(fields: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} ⟨f_i, f_j⟩ of fields [B, F, k] -> [B], in O(F·k)."""
    return 0.5 * (fields.sum(1).square() - fields.square().sum(1)).sum(1)


class DeepFMTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        self.layout = layout
        self.linear = LinearPart(layout, n_dense)
        self.deep = DeepFMModule(MLP(sparse_width(layout) + n_dense, cfg.mlp, cfg.activation, out=1))

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        fields = sparse_fields(x, self.layout)
        x0 = torch.cat([*fields, dense], dim=1)  # trainer.models.fields.flat, from the fields at hand
        return self.linear(x0) + fm(torch.stack(fields, dim=1)) + self.deep([x0]).squeeze(1)


class DeepFM(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, DeepFMTower(layout, cfg, n_dense), device)
