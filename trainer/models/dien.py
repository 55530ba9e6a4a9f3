"""Deep Interest Evolution Network (the DIEN paper, §4, Fig. 1).

    behaviours e[1..T] --GRU--> interest states h[1..T]            (interest extractor, Eq. 2–5)
                                 + α·L_aux with next behaviours and negatives     (Eq. 6–7)
    a_t = softmax_t(h_t W e_a) over the real steps                 (Eq. 8)
    h[1..T], a --AUGRU | AGRU | AIGRU--> final interest h'[T]      (interest evolving, Eq. 9–12)
    MLP([e_a, h'[T], (Σ e, e_a ⊙ Σ e), pooled features, dense features]) -> click logit

The sum-pooled history and its product with the candidate (`model.history_sum`) are inputs of
the MLP in the authors' released code, not in the paper's text.

The interest state has the width of a behaviour (H = D), so that Eq. 6 can take the inner product
of h_t and e[t+1]. Both GRUs run through a sequence kernel (trainer.models.gru.sequence: Triton on
a GPU, C++ on the CPU) by default.
In training with α > 0 the model returns (logits, α·L_aux); otherwise logits.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from embedding.layout import FeatureLayout, jagged_rows
from trainer.config import ModelConfig
from trainer.models.base import sum_pool
from trainer.models.gru import AttentionGRUCell, run_sequence, sequence
from trainer.models.layers import MLP, CTRModel, Lookups, Tower


def padded(values: torch.Tensor, lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Jagged rows [N, D] with `lengths` [B] -> [B, steps, D], zeros after each row's length."""
    b = lengths.numel()
    row = jagged_rows(lengths, values.shape[0])
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(values.shape[0], device=values.device) - starts.index_select(0, row)
    out = values.new_zeros(b, steps, values.shape[1])
    return out.index_put((row, pos), values)


def history_steps(lengths: torch.Tensor, max_steps: int, static: bool | None) -> int:
    """T of the padded histories: the configured longest history (`max_steps`) on a GPU (no read
    of the device, the same shapes every step) or with `static`; else the batch's longest. Steps
    past a row's length change nothing (the tests' padding invariance)."""
    static = lengths.is_cuda if static is None else static
    if static and max_steps:
        return max_steps
    return int(lengths.max()) if lengths.numel() else 0


class DIEN(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, DIENTower(layout, cfg, n_dense), device)


class DIENTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        d = layout.behaviour_dim
        self.extractor = AttentionGRUCell(d, d)
        self.attention = nn.Linear(d, d, bias=False)  # W of Eq. 8, applied to e_a
        self.evolution = AttentionGRUCell(d, d)
        self.kind = cfg.evolution
        self.alpha = cfg.aux_loss
        self.aux_net = AuxiliaryNet(d) if cfg.aux_net == "mlp" and self.alpha > 0 else None
        self.run = run_sequence if cfg.gru_kernel == "loop" else functools.partial(sequence, kernel=cfg.gru_kernel)
        self.history_sum = cfg.history_sum
        self.max_steps, self.static_steps = layout.max_hist_len, None
        self.mlp = MLP((4 if self.history_sum else 2) * d + layout.pooled_dim + n_dense, cfg.mlp, cfg.activation, out=1)

    def _steps(self, lengths: torch.Tensor) -> int:
        return history_steps(lengths, self.max_steps, self.static_steps)

    def _interests(self, x: Lookups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> behaviours e [B, T, D], interest states h [B, T, D], attention a [B, T] (Eq. 8), the
        real steps [B, T] and lengths [B]."""
        lengths = x.lengths.long()
        steps = self._steps(lengths)
        e = padded(x.hist, lengths, steps)  # [B, T, D]
        states, _ = self.run(self.extractor, e, lengths)  # h_t, zero after the length
        real = torch.arange(steps, device=e.device).unsqueeze(0) < lengths.unsqueeze(1)
        scores = torch.bmm(states, self.attention(x.cand).unsqueeze(2)).squeeze(2)  # h_t W e_a: [B, T]
        # softmax over the real steps only; a row without behaviours gets no attention at all
        att = F.softmax(scores.masked_fill(~real, torch.finfo(scores.dtype).min), dim=1).masked_fill(~real, 0.0)
        return e, states, att, real, lengths

    def attention_weights(self, x: Lookups) -> tuple[torch.Tensor, torch.Tensor]:
        """a_t of Eq. 8 for every behaviour, [N] (jagged, oldest first), and the lengths [B]."""
        _, _, att, real, lengths = self._interests(x)
        return att[real], lengths

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        e, states, att, _, lengths = self._interests(x)
        _, final = self.run(self.evolution, states, lengths, att, self.kind)
        parts = [x.cand, final]
        if self.history_sum:
            total = sum_pool(x.hist, lengths, x.cand.shape[0])
            parts += [total, x.cand * total]
        logits = self.mlp(torch.cat([*parts, x.pooled, dense], dim=1)).squeeze(1)
        if self.training and self.alpha > 0:
            if x.neg is None:
                raise ValueError("DIEN with an auxiliary loss needs the neg_hist_* features in the batch")
            neg = padded(x.neg, lengths, e.shape[1])
            return logits, self.alpha * auxiliary_loss(states, e, neg, lengths, self.aux_net)
        return logits


class AuxiliaryNet(nn.Module):
    """σ(h_t, e) of Eq. 6 as the authors' released DIEN code computes it: a small MLP on
    [h_t, e] (BatchNorm → 100 → sigmoid → 50 → sigmoid → 2-way softmax there; one logit here,
    which is the same function: softmax([z0, z1])[0] = sigmoid(z0 − z1))."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm1d(2 * dim),
            nn.Linear(2 * dim, 100),
            nn.Sigmoid(),
            nn.Linear(100, 50),
            nn.Sigmoid(),
            nn.Linear(50, 1),
        )

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:  # [M, H], [M, D] -> [M]
        return self.net(torch.cat([h, e], dim=1)).squeeze(1)


def auxiliary_loss(
    states: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, lengths: torch.Tensor, net: AuxiliaryNet | None = None
) -> torch.Tensor:
    """Eq. 6: L_aux = −(1/N) Σ_i Σ_t [log σ(h_t, e[t+1]) + log(1 − σ(h_t, ê[t+1]))].

    states [B, T, H]: interest states h_t; pos [B, T, H]: the behaviour embeddings e[t];
    neg [B, T, H]: negative embeddings ê[t]; lengths [B]. The next behaviour supervises each
    state, so step t counts when t + 1 < length; N is the number of sequences (B).
    σ(x1, x2) = 1 / (1 + exp(−x1·x2)), an inner product (H equals the embedding width), or,
    with `net`, the released code's auxiliary network on the valid steps only.
    """
    b, t, _ = states.shape
    if t < 2 and net is None:
        return states.new_zeros(())
    valid = torch.arange(1, t, device=states.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T-1]
    # log σ(x) = −softplus(−x) and log(1 − σ(x)) = −softplus(x), stable for large |x|
    if net is None:
        h = states[:, :-1]  # h_t for t = 0 .. T-2, against e[t+1] and ê[t+1]
        per_step = F.softplus(-(h * pos[:, 1:]).sum(-1)) + F.softplus((h * neg[:, 1:]).sum(-1))  # [B, T-1]
        return (per_step * valid.to(per_step.dtype)).sum() / b
    h, pos, neg = states[:, :-1][valid], pos[:, 1:][valid], neg[:, 1:][valid]  # supervised steps only: [M, ·]
    if h.shape[0] == 0:  # no supervised step: zero, with the network's parameters in the graph (DDP)
        return sum(p.sum() for p in net.parameters()) * 0.0 + states.sum() * 0.0
    # one call, so that BatchNorm normalises positives and negatives with the same statistics
    pos_logit, neg_logit = net(torch.cat([h, h]), torch.cat([pos, neg])).chunk(2)
    return (F.softplus(-pos_logit) + F.softplus(neg_logit)).sum() / b
