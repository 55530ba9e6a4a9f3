"""Deep Interest Evolution Network (dien-paper.md §4). So far: the auxiliary loss of the
interest extractor layer; the model itself is still to come (issue 7).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def auxiliary_loss(states: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
    """Eq. 6: L_aux = −(1/N) Σ_i Σ_t [log σ(h_t·e[t+1]) + log(1 − σ(h_t·ê[t+1]))].

    states [B, T, H]: interest states h_t; pos [B, T, H]: the behaviour embeddings e[t];
    neg [B, T, H]: negative embeddings ê[t]; lengths [B]. The next behaviour supervises each
    state, so step t counts when t + 1 < length; N is the number of sequences (B) and
    σ(x1, x2) = 1 / (1 + exp(−x1·x2)), an inner product (H equals the embedding width).
    """
    b, t, _ = states.shape
    if t < 2:
        return states.new_zeros(())
    h = states[:, :-1]  # h_t for t = 0 .. T-2
    pos_logit = (h * pos[:, 1:]).sum(-1)  # [B, T-1]
    neg_logit = (h * neg[:, 1:]).sum(-1)
    valid = (torch.arange(1, t, device=states.device).unsqueeze(0) < lengths.unsqueeze(1)).to(states.dtype)
    # log σ(x) = −softplus(−x) and log(1 − σ(x)) = −softplus(x), stable for large |x|
    per_step = F.softplus(-pos_logit) + F.softplus(neg_logit)
    return (per_step * valid).sum() / b
