"""Multi-Interactive Attention Network (the MIAN paper, §3, Fig. 2): the candidate e_i meets the
behaviours, the user profile and the context in three local modules, a global module weighs
their outputs against the raw embeddings, and an MLP predicts (Eq. 16–17, one logit here).

    IBIM (Eq. 3–9)   h = PreLN-Transformer(e_b) (one block: x + MHA(LN(x)), then x + FFN(LN(x)),
                     FFN = ReLU between two linear maps); V_t = [e_i, h_t];
                     α_t = softmax_t tanh(V_t·w + b) over the real behaviours; R_ibim = Σ_t α_t V_t
    IUIM (Eq. 10–11) V_j = [e_i, e_u^j] per profile field; α_j = softmax_j tanh(V_j·w_j + b_j);
                     R_iuim = Σ_j α_j V_j
    ICIM (Eq. 12–13) the same over the context fields: R_icim
    GIM  (Eq. 14–15) parts r = {e_i, e_c, e_b, e_u, P(R_ibim), P(R_iuim), P(R_icim)};
                     β_l = softmax_l tanh(P(r_l)·w_l + b_l); R_g = Σ_l β_l P(r_l)

What the paper leaves open, and the choice made here:
- padded behaviours are masked everywhere: as keys of the self-attention, in α_t, in e_b (the
  behaviours summed); a row without behaviours has R_ibim = 0 (its self-attention attends to
  one zero position, whose output is not used). No position encoding by default (the paper names
  none); `model.position: recency` adds a learnt vector per place counted from the most recent
  behaviour back (Vaswani et al.'s Transformer adds positions to its inputs; counted from the end,
  a place does not depend on the padding).
- one set of score parameters for every step in Eq. 8 (a weight per position would depend on
  the padding); one per field in Eq. 10 and 13 and per part in Eq. 15, as written.
- the score γ: `model.score_hidden` 0 is tanh(V·w + b), a scalar, as printed; A > 0 reads W and
  b as the matrices the text calls them, γ(V) = uᵀ tanh(W V + b) with A hidden units (see
  FieldAttention: the printed scalar form lets the candidate change the weights only through
  tanh's saturation). Options, off by default: `model.score_product` adds (e_i·Q) ⊙ x to what
  the local scores (Eq. 8, 10, 13) see, a bilinear term; `model.ibim_softmax: false` weighs the
  behaviours by exp(γ(V_t)), Eq. 7 without its denominator.
- Eq. 11 and 13 sum the V_j, so a group's fields share one width: its sparse features one table
  dim (config check), and a dense feature x of a group is embedded as x·v_j, v_j learnt, of that
  width (Eq. 2 keeps scalars as they are, which leaves the sum undefined).
- Eq. 15 sums parts of different widths; P maps each part to the behaviour width D (a linear map
  per part) before the weights and the sum. `model.gim: concat` feeds the MLP the weighted parts
  side by side, [β_1 P(r_1), …, β_L P(r_L)], instead of their sum.
- a group with no field (no data.profile, or no data.context) has no module and no GIM part.
- the features in neither group (e.g. the user id, ungrouped dense features) are not dropped:
  they enter the GIM as one more part, e_o, their embeddings and values side by side.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from embedding.layout import FeatureLayout
from trainer.config import ModelConfig
from trainer.models.dien import history_steps, padded
from trainer.models.fields import group, history_sum
from trainer.models.layers import MLP, CTRModel, Lookups, Tower


class FieldAttention(nn.Module):
    """softmax_j γ(V_j) over n parts V [B, n, W], each with its own parameters (`shared`: one set
    for every part); padded parts (mask False) get no weight. -> (Σ_j α_j V_j [B, W], α [B, n]).

    γ(V) = tanh(V·w + b), a scalar (hidden = 0: Eq. 8, 10, 13, 15 read literally), or, with
    W and b the "weight and bias matrices" of the text, γ(V) = uᵀ tanh(W V + b) with `hidden` rows
    of W and a learnt u (the tanh attention of hierarchical attention networks). Read literally,
    V = [e_i, x] makes V·w = w₁·e_i + w₂·x: the candidate's term is the same for every part, so
    it reaches the weights only through tanh's saturation (docs/models.md).

    `product` = c > 0: V = [e, x] with e its first c columns, and γ also sees (e·Q) ⊙ x, Q [c, W − c]
    learnt. `softmax` False: α_j = exp(γ(V_j)), the softmax without its denominator."""

    def __init__(
        self, n: int, width: int, shared: bool = False, hidden: int = 0, product: int = 0, softmax: bool = True
    ):
        super().__init__()
        rows = 1 if shared else n
        self.hidden, self.product, self.softmax = hidden, product, softmax
        inputs = width + (width - product if product else 0)
        bound = inputs**-0.5
        self.w = nn.Parameter(torch.empty(rows, inputs, max(hidden, 1)).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(rows, max(hidden, 1)))
        self.u = nn.Parameter(torch.empty(rows, hidden).uniform_(-(hidden**-0.5), hidden**-0.5)) if hidden else None
        self.q = (
            nn.Parameter(torch.empty(rows, product, width - product).uniform_(-(product**-0.5), product**-0.5))
            if product
            else None
        )

    def scores(self, v: torch.Tensor) -> torch.Tensor:  # [B, n, W] -> [B, n]
        n = v.shape[1]
        if self.q is not None:
            e, x = v[..., : self.product], v[..., self.product :]
            v = torch.cat([v, torch.einsum("bnc,ncx->bnx", e, self.q.expand(n, -1, -1)) * x], dim=2)
        z = torch.tanh(torch.einsum("bnw,nwh->bnh", v, self.w.expand(n, -1, -1)) + self.b)
        return z.squeeze(2) if self.u is None else (z * self.u).sum(2)

    def forward(self, v: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(v)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        alpha = F.softmax(scores.float(), dim=1) if self.softmax else torch.exp(scores.float())
        if mask is not None:
            alpha = alpha.masked_fill(~mask, 0.0)  # a row with no real part: all zero
        return (alpha.unsqueeze(2).to(v.dtype) * v).sum(1), alpha


class GroupEmbedding(nn.Module):
    """A feature group's fields as [B, n, w]: sparse fields as they are, a dense field x as x·v."""

    def __init__(self, layout: FeatureLayout, names: tuple[str, ...], width: int):
        super().__init__()
        self.layout, self.names = layout, names
        dense = [n for n in names if layout.field(n)[0] == "dense"]
        self.vectors = nn.ParameterDict({n: nn.Parameter(torch.randn(width) * 0.01) for n in dense})

    def forward(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        fields = group(x, dense, self.layout, self.names)
        out = [f * self.vectors[n] if n in self.vectors else f for n, f in zip(self.names, fields, strict=True)]
        return torch.stack(out, dim=1)


def group_width(layout: FeatureLayout, names: tuple[str, ...]) -> int:
    """The one width of a group's sparse fields (the behaviour width D if it has none)."""
    dims = {layout.table_of(n).dim for n in names if layout.field(n)[0] == "pooled"}
    if len(dims) > 1:
        raise ValueError(f"MIAN: the features {list(names)} of one group need one table dim, got {sorted(dims)}")
    return dims.pop() if dims else layout.behaviour_dim


class Interaction(nn.Module):
    """IUIM / ICIM (Eq. 10–13): the candidate beside each field of a group, weighted."""

    def __init__(self, layout: FeatureLayout, names: tuple[str, ...], d: int, hidden: int, product: bool):
        super().__init__()
        w = group_width(layout, names)
        self.fields = GroupEmbedding(layout, names, w)
        self.attention = FieldAttention(len(names), d + w, hidden=hidden, product=d if product else 0)
        self.raw_width, self.width = len(names) * w, d + w  # e_* and R_*

    def forward(self, x: Lookups, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fields = self.fields(x, dense)  # [B, n, w]
        v = torch.cat([x.cand.unsqueeze(1).expand(-1, fields.shape[1], -1), fields], dim=2)
        r, alpha = self.attention(v)
        return r, alpha, fields.flatten(1)  # R, α [B, n], the raw group e_* [B, n·w]


class MIANTower(Tower):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int):
        super().__init__(cfg.precision, cfg.compile)
        d = layout.behaviour_dim  # model.heads divides it (config check)
        self.layout, self.max_steps, self.static_steps = layout, layout.max_hist_len, None
        self.transformer = nn.TransformerEncoderLayer(
            d, cfg.heads, cfg.ffn, dropout=0.0, activation="relu", batch_first=True, norm_first=True
        )
        # model.position=recency: a learnt vector per place from the most recent behaviour back,
        # added to the behaviours before the Transformer (the GIM's e_b stays their raw sum;
        # N(0, 0.02²), the paper's initial scale)
        self.position = None
        if cfg.position == "recency":
            if not self.max_steps:
                raise ValueError("MIAN: model.position=recency needs the longest history (data.max_hist_len)")
            self.position = nn.Embedding(self.max_steps, d)
            nn.init.normal_(self.position.weight, std=0.02)
        a, product = cfg.score_hidden, cfg.score_product
        self.ibim = FieldAttention(
            1, 2 * d, shared=True, hidden=a, product=d if product else 0, softmax=cfg.ibim_softmax
        )
        self.iuim = Interaction(layout, layout.profile, d, a, product) if layout.profile else None
        self.icim = Interaction(layout, layout.context, d, a, product) if layout.context else None
        widths = {"e_i": d, "e_b": d, "R_ibim": 2 * d}
        for name, module in (("u", self.iuim), ("c", self.icim)):
            if module is not None:
                widths[f"e_{name}"], widths[f"R_i{name}im"] = module.raw_width, module.width
        grouped = set(layout.profile) | set(layout.context)
        self.others = tuple(f for f in (*layout.other_pooled_features, *layout.dense) if f not in grouped)
        if self.others:
            widths["e_o"] = sum(end - start for _, start, end in map(layout.field, self.others))
        self.parts = tuple(widths)
        self.project = nn.ModuleDict({k: nn.Linear(w, d, bias=False) for k, w in widths.items()})
        self.gim = FieldAttention(len(widths), d, hidden=a)
        self.concat = cfg.gim == "concat"
        self.mlp = MLP(d * (len(widths) if self.concat else 1), cfg.mlp, cfg.activation, out=1)

    def _ibim(self, x: Lookups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> R_ibim [B, 2D], α_t [B, T] (zero on padding), real [B, T]."""
        lengths = x.lengths.long()
        steps = max(history_steps(lengths, self.max_steps, self.static_steps), 1)
        e = padded(x.hist, lengths, steps)  # [B, T, D]
        places = torch.arange(steps, device=e.device)
        real = places.unsqueeze(0) < lengths.unsqueeze(1)
        keys = real.clone()
        keys[:, 0] |= lengths == 0  # a row without behaviours attends to one zero position
        if self.position is not None:  # the place from the most recent back: padding does not move it
            back = (lengths.unsqueeze(1) - 1 - places).clamp(min=0)
            e = e + self.position(back) * real.unsqueeze(2).to(e.dtype)
        h = self.transformer(e, src_key_padding_mask=~keys)
        v = torch.cat([x.cand.unsqueeze(1).expand(-1, steps, -1), h], dim=2)  # V_t, Eq. 6
        r, alpha = self.ibim(v, real)
        return r, alpha, real

    def _parts(self, x: Lookups, dense: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """-> the parts of Eq. 15, and the attention weights (behaviours padded, [B, T], with
        "real" [B, T]: the jagged ones are a data-dependent selection, a host sync on a GPU)."""
        r_ibim, a_b, real = self._ibim(x)
        parts = {"e_i": x.cand, "e_b": history_sum(x), "R_ibim": r_ibim}
        weights = {"behaviours": a_b, "real": real}
        for name, module in (("u", self.iuim), ("c", self.icim)):
            if module is not None:
                r, alpha, raw = module(x, dense)
                parts[f"e_{name}"], parts[f"R_i{name}im"] = raw, r
                weights["profile" if name == "u" else "context"] = alpha
        if self.others:
            parts["e_o"] = torch.cat(group(x, dense, self.layout, self.others), dim=1)
        return parts, weights

    def _global(self, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.stack([self.project[k](parts[k]) for k in self.parts], dim=1)  # [B, L, D]
        r, beta = self.gim(p)
        if self.concat:
            r = (beta.unsqueeze(2).to(p.dtype) * p).flatten(1)
        return r, beta

    def compute(self, x: Lookups, dense: torch.Tensor) -> torch.Tensor:
        parts, _ = self._parts(x, dense)
        return self.mlp(self._global(parts)[0]).squeeze(1)

    def attention_weights(self, x: Lookups) -> tuple[torch.Tensor, torch.Tensor]:
        """α_t of Eq. 7 for every behaviour, [N] (jagged, oldest first), and the lengths [B]."""
        _, alpha, real = self._ibim(x)
        return alpha[real], x.lengths

    def all_weights(self, x: Lookups, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every attention weight of the model: behaviours [N] (jagged), profile [B, J],
        context [B, K] (Eq. 10, 13) and the GIM parts [B, L] (Eq. 15, `parts` order)."""
        parts, weights = self._parts(x, dense)
        weights["behaviours"] = weights["behaviours"][weights.pop("real")]
        weights["global"] = self._global(parts)[1]
        return weights


class MIAN(CTRModel):
    def __init__(self, layout: FeatureLayout, cfg: ModelConfig, n_dense: int, device: torch.device | None = None):
        super().__init__(layout, MIANTower(layout, cfg, n_dense), device)
