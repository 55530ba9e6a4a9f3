"""The model zoo against independent write-outs of each paper's equations (numpy, or plain
PyTorch on padded tensors), with the models' own weights copied in, on the tiny world with
profile and context features; padding invariance; MIAN's attention weights; every model trains
with every sparse optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from embedding.layout import FeatureLayout
from trainer.config import ConfigError
from trainer.data import stream_from_config
from trainer.models import MODELS
from trainer.models.activations import PReLU

BASELINES = ["lr", "wide_deep", "pnn", "deepfm", "dcn", "xdeepfm"]


def _model(cfg, seed=1):
    layout = FeatureLayout.from_config(cfg)
    torch.manual_seed(seed)
    model = MODELS[cfg.model.name](layout, cfg.model, len(cfg.data.dense_features))
    for coll in (model.sparse.ec, model.sparse.ebc):
        if coll is not None:
            tables = coll.embeddings if hasattr(coll, "embeddings") else coll.embedding_bags
            for t in tables.values():
                nn.init.normal_(t.weight, std=0.5)
    with torch.no_grad():  # zero-initialised parameters (biases) made nonzero: the checks see them
        for p in model.tower.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return layout, model.eval()


def np_mlp(mlp: nn.Sequential, x: np.ndarray) -> np.ndarray:
    """Linear layers and PReLU, written out in numpy."""
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            x = x @ _np(layer.weight).T + _np(layer.bias)
        elif isinstance(layer, PReLU):
            x = np.where(x > 0, x, _np(layer.weight) * x)
        else:
            raise TypeError(type(layer))
    return x


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_fields(model, layout, batch) -> list[np.ndarray]:
    """Every sparse field from the tables and the batch's ids (histories summed over a padded,
    masked array): candidate item, candidate category, history items, history categories, then
    the other pooled features."""
    jts = batch.pooled.to_dict()
    tables = {name: _np(t.weight) for name, t in model.sparse.ebc.embedding_bags.items()}
    out, hist = [], []
    for cand, beh in layout.pairs:
        w = tables[layout.table_of(cand).name]
        out.append(w[jts[cand].values().numpy()])
        ids = jts[beh].to_padded_dense(padding_value=0).numpy()
        mask = np.arange(ids.shape[1])[None, :] < jts[beh].lengths().numpy()[:, None]
        hist.append((w[ids] * mask[:, :, None]).sum(1))
    out += hist
    for f in layout.other_pooled_features:
        out.append(tables[layout.table_of(f).name][jts[f].values().numpy()])
    return out


def np_baseline(name, tower, fields, dense, cfg) -> np.ndarray:
    """Each baseline's logit from its paper's formula, fields [B, k] each, dense [B, F]."""
    x0 = np.concatenate([*fields, dense], axis=1)
    stack = np.stack(fields, axis=1)  # [B, m, k]

    def linear(part):
        return (x0 @ _np(part.linear.weight).T + _np(part.linear.bias))[:, 0]

    if name == "lr":
        return linear(tower.linear)
    if name == "wide_deep":
        return linear(tower.wide) + np_mlp(tower.deep, x0)[:, 0]
    if name == "pnn":
        m = stack.shape[1]
        products = [np.einsum("bk,bk->b", stack[:, i], stack[:, j]) for i in range(m) for j in range(i + 1, m)]
        return np_mlp(tower.mlp, np.concatenate([*fields, np.stack(products, 1), dense], axis=1))[:, 0]
    if name == "deepfm":
        fm = sum(np.einsum("bk,bk->b", stack[:, i], stack[:, j]) for i in range(len(fields)) for j in range(i))
        return linear(tower.linear) + fm + np_mlp(tower.deep.dense_module, x0)[:, 0]
    if name == "dcn":
        xl = x0
        for layer in range(cfg.cross_layers):
            w, b = _np(tower.cross.kernels[layer]), _np(tower.cross.bias[layer])
            if cfg.cross == "v1":  # x0 (x_l·w) + b + x_l
                xl = x0 * (xl @ w) + b[:, 0] + xl
            else:  # x0 ⊙ (W x_l + b) + x_l
                xl = x0 * (xl @ w.T + b[:, 0]) + xl
        deep = np_mlp(tower.deep, x0)
        out = tower.out
        return (np.concatenate([xl, deep], 1) @ _np(out.weight).T + _np(out.bias))[:, 0]
    if name == "xdeepfm":  # CIN, Eq. 6: X^k_h = Σ_ij W^{k,h}_ij (X^{k-1}_i ∘ X^0_j), then Σ_d
        xk, pooled = stack, []
        for conv in tower.cin.convs:
            w = _np(conv.weight)[:, :, 0].reshape(conv.out_channels, xk.shape[1], stack.shape[1])
            xk = np.einsum("hij,bid,bjd->bhd", w, xk, stack) + _np(conv.bias)[None, :, None]
            pooled.append(xk.sum(2))
        cin = np.concatenate(pooled, 1) @ _np(tower.cin.out.weight).T + _np(tower.cin.out.bias)
        return linear(tower.linear) + cin[:, 0] + np_mlp(tower.deep, x0)[:, 0]
    raise KeyError(name)


@pytest.mark.parametrize(
    "name,extra",
    [(m, ()) for m in BASELINES] + [("dcn", ("model.cross=v2",))],
    ids=[*BASELINES, "dcn_v2"],
)
def test_baseline_forward_against_its_formula(zoo_cfg, name, extra):
    cfg = zoo_cfg(f"model.name={name}", "model.activation=prelu", "data.dense_features=[p_click]", *extra)
    layout, model = _model(cfg)
    assert layout.history_pooled and model.sparse.ec is None  # histories summed by the lookup
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    fields = np_fields(model, layout, batch)
    assert len(fields) == 10  # item, cate, Σ items, Σ cates, user, 3 profile, 2 context
    want = np_baseline(name, model.tower, fields, batch.dense.double().numpy(), cfg.model)
    with torch.no_grad():
        got = model(batch).double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    assert np.std(want) > 1e-3  # the rows differ: the check is not on a constant


def test_field_models_need_one_table_dim(tiny_cfg):
    for name in ("pnn", "deepfm", "xdeepfm"):
        with pytest.raises(ConfigError, match="every table needs one dim"):
            tiny_cfg(f"model.name={name}")  # the tiny user table is 4 wide, the others 8
    tiny_cfg("model.name=dcn")  # concatenates: any widths


def test_groups_are_checked(zoo_cfg):
    with pytest.raises(ConfigError, match=r"data.profile.0: 'ghost' is neither read by a table"):
        zoo_cfg("data.profile=[ghost]")
    with pytest.raises(ConfigError, match="already in data.profile"):
        zoo_cfg("data.context=[gender]")
    with pytest.raises(ConfigError, match="candidate or behaviour feature"):
        zoo_cfg("data.profile=[item_id]")
    with pytest.raises(ConfigError, match="does not divide the behaviour width 16"):
        zoo_cfg("model.name=mian", "model.heads=3")


# ---- MIAN: a plain-PyTorch write-out of §3 on padded tensors (float64)


def layer_norm(x, ln):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def softmax_attention(v, att, mask=None):
    """softmax_j γ(V_j) over the parts j of v [B, n, W]; γ(V_j) = tanh(V_j·w_j + b_j), or
    u_jᵀ tanh(W_j V_j + b_j) with a hidden layer; one parameter set for all parts if shared;
    V_j = [e, x] extended by (e·Q_j) ⊙ x where the module has a product term."""
    w, b = att.w.detach().double(), att.b.detach().double()
    u = None if att.u is None else att.u.detach().double()
    s = []
    for j in range(v.shape[1]):
        k = j if w.shape[0] > 1 else 0
        x = v[:, j]
        if att.q is not None:  # model.score_product: the score also sees (e_i·Q) ⊙ x
            c = att.q.shape[1]
            x = torch.cat([x, (x[:, :c] @ att.q[k].detach().double()) * x[:, c:]], 1)
        z = torch.tanh(x @ w[k] + b[k])  # [B, H]
        s.append(z[:, 0] if u is None else z @ u[k])
    s = torch.stack(s, 1)
    if mask is not None:
        s = s.masked_fill(~mask, -torch.inf)
    a = torch.softmax(s, dim=1) if att.softmax else torch.exp(s)  # model.ibim_softmax=false: no denominator
    return (a.unsqueeze(2) * v).sum(1), a


def reference_mian(tower, layout, tables, batch, pad_to, heads):
    """Eq. 3–15 and the DNN, written out; the histories padded to `pad_to` steps. -> the logits
    and the attention weights (`MIANTower.all_weights`' keys)."""
    f64 = {k: v.detach().double() for k, v in tables.items()}
    jt = {**batch.sparse.to_dict(), **batch.pooled.to_dict()}
    cand = torch.cat([f64[layout.table_of(c).name][jt[c].values()] for c, _ in layout.pairs], 1)
    lengths = jt[layout.pairs[0][1]].lengths().long()
    t = pad_to
    mask = torch.arange(t)[None, :] < lengths[:, None]
    e = (
        torch.cat(
            [
                f64[layout.table_of(h).name][
                    torch.nn.functional.pad(jt[h].to_padded_dense(padding_value=0), (0, t - int(lengths.max())))
                ]
                for _, h in layout.pairs
            ],
            2,
        )
        * mask[:, :, None]
    )
    e_b = e.sum(1)  # the raw behaviours of the GIM (Eq. 14): no position
    if tower.position is not None:  # model.position=recency: place 0 is the most recent behaviour
        back = (lengths[:, None] - 1 - torch.arange(t)[None, :]).clamp(min=0)
        e = e + tower.position.weight.detach().double()[back] * mask[:, :, None]
    tr = tower.transformer
    d = e.shape[2]
    dh = d // heads
    p = {k: v.detach().double() for k, v in tr.named_parameters()}
    # Pre-LN block, Eq. 3–5: x + MultiHead(LN(x)), then + FFN(LN(·))
    ln1 = layer_norm(e, tr.norm1)
    wq, wk, wv = p["self_attn.in_proj_weight"].split(d)
    bq, bk, bv = p["self_attn.in_proj_bias"].split(d)
    q, k, v = (ln1 @ w.T + bb for w, bb in ((wq, bq), (wk, bk), (wv, bv)))
    outs = []
    for i in range(heads):
        sl = slice(i * dh, (i + 1) * dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / dh**0.5  # [B, T, T]
        s = s.masked_fill(~mask[:, None, :], -torch.inf)
        a = torch.softmax(s, -1).nan_to_num(0.0)  # rows without behaviours: unused
        outs.append(a @ v[..., sl])
    m = torch.cat(outs, -1) @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
    x = e + m
    l2 = layer_norm(x, tr.norm2)
    h = x + torch.relu(l2 @ p["linear1.weight"].T + p["linear1.bias"]) @ p["linear2.weight"].T + p["linear2.bias"]
    vt = torch.cat([cand[:, None, :].expand(-1, t, -1), h], 2)  # Eq. 6
    r_ibim, alpha = softmax_attention(vt, tower.ibim, mask)  # Eq. 7–9
    r_ibim = torch.where((lengths > 0)[:, None], r_ibim, 0.0)
    parts = {"e_i": cand, "e_b": e_b, "R_ibim": r_ibim}
    weights = {"behaviours": alpha[mask]}
    for key, module, names in (("u", tower.iuim, layout.profile), ("c", tower.icim, layout.context)):
        fields = torch.stack([f64[layout.table_of(n).name][jt[n].values()] for n in names], 1)
        vj = torch.cat([cand[:, None, :].expand(-1, len(names), -1), fields], 2)  # Eq. 10, 12
        r, weights["profile" if key == "u" else "context"] = softmax_attention(vj, module.attention)
        parts[f"e_{key}"], parts[f"R_i{key}im"] = fields.flatten(1), r
    parts["e_o"] = f64["user"][jt["user_id"].values()]  # the one feature in no group
    proj = torch.stack([parts[k] @ tower.project[k].weight.double().T for k in tower.parts], 1)
    r_g, beta = softmax_attention(proj, tower.gim)  # Eq. 15
    if tower.concat:  # model.gim=concat: the weighted parts side by side
        r_g = (beta.unsqueeze(2) * proj).flatten(1)
    weights["global"] = beta
    mlp = tower.mlp
    return torch.from_numpy(np_mlp(mlp, r_g.numpy()))[:, 0], weights


def _mian(zoo_cfg, *overrides):
    cfg = zoo_cfg("model.name=mian", "model.activation=prelu", *overrides)
    layout, model = _model(cfg)
    if model.tower.position is not None:  # large enough that a place off by one, or moved by padding, shows
        with torch.no_grad():
            model.tower.position.weight.normal_()
    tables = {n: t.weight for n, t in model.sparse.ec.embeddings.items()}
    tables.update({n: t.weight for n, t in model.sparse.ebc.embedding_bags.items()})
    return cfg, layout, model, tables


@pytest.mark.parametrize(
    "variant",
    [
        (),
        ("model.score_hidden=6", "model.gim=concat"),
        ("model.score_hidden=6", "model.score_product=true", "model.ibim_softmax=false"),
        ("model.position=recency", "model.score_hidden=6", "model.score_product=true", "model.gim=concat"),
    ],
    ids=["as_printed", "hidden_concat", "hidden_product_exp", "recency"],
)
def test_mian_forward_against_the_papers_equations(zoo_cfg, variant):
    cfg, layout, model, tables = _mian(zoo_cfg, *variant)
    assert model.tower.parts == ("e_i", "e_b", "R_ibim", "e_u", "R_iuim", "e_c", "R_icim", "e_o")
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    lengths = batch.feature("hist_item_id").lengths()
    assert lengths.min() < lengths.max()  # real padding inside the batch
    with torch.no_grad():
        got = model(batch).double()
        # the weights too: at this init a score moves the logits by less than the tolerance
        got_w = model.tower.all_weights(model.lookups(batch), batch.dense)
        for pad in (int(lengths.max()), cfg.data.max_hist_len + 5):
            want, want_w = reference_mian(model.tower, layout, tables, batch, pad, cfg.model.heads)
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
            for k, w in want_w.items():
                torch.testing.assert_close(got_w[k].double(), w, rtol=0, atol=1e-5, msg=k)
    assert float(got.std()) > 1e-3


@pytest.mark.parametrize("position", ["none", "recency"])
def test_mian_is_padding_invariant_and_its_weights_sum_to_one(zoo_cfg, position):
    """The same logits with the histories padded to the batch's longest or to data.max_hist_len
    (static steps, a GPU's shapes) and for a row alone; every attention weight set sums to one
    (over the real behaviours for α_t), and a row without behaviours gets finite logits."""
    cfg, layout, model, _ = _mian(zoo_cfg, f"model.position={position}")
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    tower = model.tower
    with torch.no_grad():
        x = model.lookups(batch)
        dynamic = tower(x, batch.dense)
        tower.static_steps = True
        static = tower(x, batch.dense)
        tower.static_steps = None
        torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-5)
        # a row shorter than the batch's longest (padded in the batch), alone
        i = int(torch.nonzero(x.lengths < x.lengths.max())[0])
        rows = stream_from_config(zoo_cfg("model.name=mian", "data.batch_size=1"), "test").epoch(0)
        one = next(r for j, r in enumerate(rows) if j == i)
        torch.testing.assert_close(model(one), dynamic[i : i + 1], rtol=1e-5, atol=1e-5)
        w = tower.all_weights(x, batch.dense)
        per_row = torch.zeros(len(batch), dtype=torch.float64).index_add_(
            0, torch.repeat_interleave(torch.arange(len(batch)), x.lengths.long()), w["behaviours"].double()
        )
        torch.testing.assert_close(per_row[x.lengths > 0], torch.ones(int((x.lengths > 0).sum()), dtype=torch.float64))
        for k in ("profile", "context", "global"):
            torch.testing.assert_close(w[k].sum(1).double(), torch.ones(len(batch), dtype=torch.float64))
        assert w["profile"].shape == (len(batch), 3) and w["context"].shape == (len(batch), 2)
        empty = x._replace(hist=x.hist[:0], lengths=torch.zeros_like(x.lengths))
        assert torch.isfinite(tower(empty, batch.dense)).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_trains_on_the_zoo_config(zoo_cfg, name):
    from trainer.loop import train

    cfg = zoo_cfg(f"model.name={name}", "train.epochs=1", "train.limit_batches=12")
    r = train(cfg, progress=False)
    assert r["model"] == name and 0 < r["auc"] < 1 and np.isfinite(r["logloss"])


@pytest.mark.parametrize(
    "optimizer", ["sgd", "rowwise_adagrad", "adam", "sgd_mba", "rowwise_adagrad_mba", "partial_rowwise_adam_mba"]
)
@pytest.mark.parametrize("name", ["deepfm", "mian"])
def test_zoo_models_train_with_every_sparse_optimizer(zoo_cfg, name, optimizer):
    from trainer.loop import train

    lam = ["sparse_optimizer.lambda=0.01"] if optimizer.endswith("_mba") else []
    cfg = zoo_cfg(f"model.name={name}", f"sparse_optimizer.type={optimizer}", "train.limit_batches=6", *lam)
    r = train(cfg, progress=False)
    assert np.isfinite(r["logloss"])


def test_mian_embeds_a_dense_group_field_as_x_times_v(zoo_cfg):
    """A dense feature in a group enters IUIM as x·v_j (v_j learnt), beside the sparse fields."""
    cfg, layout, model, _ = _mian(zoo_cfg, "data.dense_features=[p_click]", "data.profile=[gender, age, p_click]")
    model.train()
    batch = next(iter(stream_from_config(cfg, "test").epoch(0)))
    x = model.lookups(batch)
    fields = model.tower.iuim.fields(x, batch.dense)  # [B, 3, 8]
    v = model.tower.iuim.fields.vectors["p_click"]
    torch.testing.assert_close(fields[:, 2], batch.dense[:, :1] * v)
    torch.testing.assert_close(fields[:, 0], x.pooled[:, slice(*layout.field("gender")[1:])])
    model(batch).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert "e_o" not in model.tower.parts or "p_click" not in model.tower.others  # grouped: not an "other" part
