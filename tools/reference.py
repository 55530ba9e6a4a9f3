"""A plain-PyTorch DIN, written the common way (nn.Embedding, histories padded to [B, T] with a
mask), used as the baseline of `dinrec bench train` and as an independent reference in tests.

Same shape as trainer.models.DIN: behaviour = concatenated embeddings of its features, attention
MLP on [e_h, e_a, e_h − e_a, e_h ⊙ e_a] → scalar weight without softmax, padded steps masked to
0 weight, MLP on [e_a, v_U(A)] to one logit.
"""

from __future__ import annotations

import torch
from torch import nn

from embedding.layout import FeatureLayout
from trainer.batch import Batch
from trainer.config import ModelConfig
from trainer.models.layers import MLP


class ReferenceDIN(nn.Module):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, sparse_grad: bool = True):
        super().__init__()
        if layout.pooled_tables:
            raise ValueError("the reference DIN supports behaviour tables only (no pooled tables)")
        self.layout = layout
        # One nn.Embedding per table; pair p looks up table_index[p].
        self.tables = nn.ModuleList(nn.Embedding(t.num_rows, t.dim, sparse=sparse_grad) for t in layout.seq_tables)
        names = [t.name for t in layout.seq_tables]
        self.table_index = [names.index(layout.table_of(c).name) for c, _ in layout.pairs]
        d = layout.behaviour_dim
        self.attention = MLP(4 * d, cfg.attention_mlp, cfg.activation, out=1)
        self.mlp = MLP(2 * d, cfg.mlp, cfg.activation, out=1)

    def forward(self, cand_ids: torch.Tensor, hist_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # cand_ids [B, P], hist_ids [B, T, P] (padding: any valid id), mask [B, T] -> logits [B]
        cand = torch.cat([self.tables[t](cand_ids[:, p]) for p, t in enumerate(self.table_index)], -1)
        hist = torch.cat([self.tables[t](hist_ids[:, :, p]) for p, t in enumerate(self.table_index)], -1)
        c = cand.unsqueeze(1).expand_as(hist)  # [B, T, D]
        x = torch.cat([hist, c, hist - c, hist * c], dim=-1)  # [B, T, 4D]
        b, t, _ = x.shape
        w = self.attention(x.reshape(b * t, -1)).reshape(b, t) * mask  # no softmax
        user = (w.unsqueeze(-1) * hist).sum(1)  # [B, D]
        return self.mlp(torch.cat([cand, user], dim=-1)).squeeze(1)

    def load_from(self, din: nn.Module) -> None:
        """Copy the weights of an unsharded trainer.models.DIN of the same layout."""
        for table, cfg in zip(self.tables, self.layout.seq_tables, strict=True):
            table.weight.data.copy_(din.sparse.ec.embeddings[cfg.name].weight.data)
        self.attention.load_state_dict(din.tower.attention.mlp.state_dict())
        self.mlp.load_state_dict(din.tower.mlp.state_dict())


def padded_inputs(batch: Batch, layout: FeatureLayout, pad_to: int = 0) -> tuple[torch.Tensor, ...]:
    """KJT of a Batch -> (cand_ids [B, P], hist_ids [B, T, P], mask [B, T]); T = max(pad_to, longest)."""
    jt = batch.sparse.to_dict()
    cand = torch.stack([jt[c].values() for c, _ in layout.pairs], 1)
    lengths = jt[layout.pairs[0][1]].lengths().long()
    b = lengths.numel()
    t = max(pad_to, int(lengths.max()) if b else 0)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T]
    hist = torch.zeros(b, t, len(layout.pairs), dtype=torch.long)
    for p, (_, h) in enumerate(layout.pairs):
        hist[:, :, p][mask] = jt[h].values()
    return cand, hist, mask.float()
