"""`dinrec eval --attention-plot PNG`: one user's attention weights over their history, for a few
candidates (the DIN paper's Fig. 5/6 idea): DIN's local activation unit a(e_j, v_A) (not
normalised), DIEN's a_t of Eq. 8 (a softmax over the history), or MIAN's α_t of Eq. 7 with, in
panels of their own, its profile and context field weights (Eq. 10, 13) and the global module's
weights of its parts (Eq. 15).

The user: `--user` (a user_id row of the test data) or the first test row with at least 8
behaviours. Candidates: that row's own candidate, then the candidates of other test rows with
categories not shown yet. Behaviours and candidates are labelled with their original ids and
category names when the data directory has `dinrec convert`'s vocab/ beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.layout import FeatureLayout
from trainer import checkpoint
from trainer.batch import Batch
from trainer.config import Config, ConfigError
from trainer.data import resolve_paths, stream_from_config
from trainer.sharding import build_model, process_group, worker_device


def _vocab(cfg: Config, name: str) -> list | None:
    """Names of the rows of an id column from `dinrec convert`'s vocab/ (a title where it has one)."""
    import pyarrow.parquet as pq

    path = Path(resolve_paths(cfg.data.test)[0]).parent.parent / "vocab" / f"{name}.parquet"
    if not path.is_file():
        return None
    t = pq.read_table(path)
    ids = [str(x) for x in t.column("id").to_pylist()]
    if "title" in t.column_names:
        return [title or i for i, title in zip(ids, t.column("title").to_pylist(), strict=True)]
    return ids


def pick(cfg: Config, user: int | None, n_candidates: int, min_hist: int = 8) -> tuple[Batch, int]:
    """A batch of K rows sharing one test row's history and other features, each with another
    candidate; -> (batch, the user's row id)."""
    rows = []  # (features of the row's batch by key, row) of the test rows read so far
    chosen = None  # (batch, its features by key, row)
    for batch in stream_from_config(cfg, "test").epoch(0):
        jts = batch.sparse.to_dict()
        lengths = jts[_pairs(cfg)[0][1]].lengths()
        for r in range(len(batch)):
            if chosen is None and (int(batch.users[r]) == user if user is not None else int(lengths[r]) >= min_hist):
                chosen = (batch, jts, r)
            else:
                rows.append((jts, r))
        if chosen is not None and len(rows) > 50 * n_candidates:
            break
    if chosen is None:
        what = f"user_id {user}" if user is not None else f"a row with at least {min_hist} behaviours"
        raise ConfigError(f"attention plot: no test row of {what} in {cfg.data.test}")
    base, base_jts, r0 = chosen
    cand_keys = {c for c, _ in _pairs(cfg)}
    per_key = {k: [] for k in base_jts}
    seen_cates: set[int] = set()
    for jts, r in [(base_jts, r0), *rows]:  # the row's own candidate first
        if "cate_id" in jts:
            cate = int(_row(jts["cate_id"], r)[0])
            if cate in seen_cates:
                continue
            seen_cates.add(cate)
        for k in per_key:
            per_key[k].append(_row(jts[k], r) if k in cand_keys else _row(base_jts[k], r0))
        if len(per_key[next(iter(per_key))]) == n_candidates:
            break
    keys = list(base.sparse.keys())
    n = len(per_key[keys[0]])
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([v for k in keys for v in per_key[k]]),
        lengths=torch.tensor([len(v) for k in keys for v in per_key[k]], dtype=torch.int32),
    )
    pooled = None
    if base.pooled is not None:  # the row's own pooled features on every candidate
        pjts, pkeys = base.pooled.to_dict(), base.pooled.keys()
        pooled = KeyedJaggedTensor(
            keys=pkeys,
            values=torch.cat([_row(pjts[k], r0).repeat(n) for k in pkeys]),
            lengths=torch.tensor([len(_row(pjts[k], r0)) for k in pkeys for _ in range(n)], dtype=torch.int32),
        )
    dense = base.dense[r0 : r0 + 1].expand(n, -1).contiguous()
    batch = Batch(kjt, dense, torch.zeros(n), base.users[r0].repeat(n), pooled=pooled)
    return batch, int(base.users[r0])


def _pairs(cfg: Config):
    return FeatureLayout.from_config(cfg).pairs


def _row(jt, r: int) -> torch.Tensor:
    off = jt.offsets()
    return jt.values()[int(off[r]) : int(off[r + 1])]


def attention_plot(
    cfg: Config, checkpoint_dir: str, path: Path, user: int | None = None, n_candidates: int = 4
) -> dict:
    if cfg.model.name not in ("din", "dien", "mian"):
        raise ConfigError(f"attention plot: model {cfg.model.name!r} has no attention (din, dien or mian)")
    if n_candidates < 1:
        raise ConfigError(f"attention plot: --candidates must be >= 1, got {n_candidates}")
    with process_group(cfg) as (_, world):
        if world != 1:
            raise ConfigError("attention plot: run it in one process (launch.launcher=local)")
        device = worker_device(cfg)
        model = build_model(cfg, world, device)
        checkpoint.load(checkpoint_dir, model)
        model.eval()
        batch, user_row = pick(cfg, user, n_candidates)
        inner = getattr(model, "module", model)
        panels = []  # MIAN: (key, title, weights [K, n], column labels)
        with torch.no_grad():
            batch = batch.to(device)
            weights, lengths = inner.attention_weights(batch)
            if cfg.model.name == "mian":
                tower = inner.tower
                every = tower.all_weights(inner.lookups(batch), batch.dense)
                layout = tower.layout
                for key, names, eq in (("profile", layout.profile, 10), ("context", layout.context, 13)):
                    if key in every:
                        panels.append((key, f"{key} field weights α_j (Eq. {eq})", every[key], list(names)))
                panels.append(("global", "global weights of the parts (Eq. 15)", every["global"], list(tower.parts)))
    w = weights.float().cpu().numpy().reshape(len(lengths), -1)  # every row has the same history
    panels = [(key, title, a.float().cpu().numpy(), labels) for key, title, a, labels in panels]
    jts = batch.sparse.to_dict()
    hist_items, hist_cates = _row(jts["hist_item_id"], 0).tolist(), _row(jts["hist_cate_id"], 0).tolist()
    cand_items = jts["item_id"].values().tolist()
    cand_cates = jts["cate_id"].values().tolist()
    items, cates, users = _vocab(cfg, "item_id"), _vocab(cfg, "cate_id"), _vocab(cfg, "user_id")

    def name(i, c):
        return f"{items[i] if items else i} · {cates[c] if cates else c}"

    _draw(
        w,
        [name(i, c) for i, c in zip(hist_items, hist_cates, strict=True)],
        [name(i, c) for i, c in zip(cand_items, cand_cates, strict=True)],
        f"user {users[user_row] if users else user_row}",
        cfg.model.name,
        path,
        panels,
    )
    return {
        "attention_plot": str(path),
        "model": cfg.model.name,
        "user_id": user_row,
        "behaviours": len(hist_items),
        "candidates": [name(i, c) for i, c in zip(cand_items, cand_cates, strict=True)],
        "weights": np.round(w, 4).tolist(),
        **{f"{key}_weights": {"columns": labels, "weights": np.round(a, 4).tolist()} for key, _, a, labels in panels},
    }


WHAT = {
    "din": "local activation weight a(e_j, v_A)",
    "dien": "attention a_t (Eq. 8, softmax over steps)",
    "mian": "behaviour weights α_t (Eq. 7, softmax over steps)",
}


def _draw(
    w: np.ndarray,
    behaviours: list[str],
    candidates: list[str],
    who: str,
    model: str,
    path: Path,
    panels: list[tuple[str, str, np.ndarray, list[str]]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = len(behaviours)
    height = 1.2 + 0.55 * len(candidates) + 1.6
    fig, axes = plt.subplots(
        1 + len(panels),
        1,
        figsize=(max(8.0, 0.32 * t + 4.0), height * (1 + len(panels))),
        dpi=120,
        squeeze=False,
    )
    for (_, title, a, labels), pax in zip(panels, axes[1:, 0], strict=True):
        pim = pax.imshow(a, aspect="auto", cmap="viridis", vmin=0)
        pax.set_yticks(range(len(candidates)), candidates)
        pax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        pax.set_title(f"{model.upper()}: {title}, {who}")
        fig.colorbar(pim, ax=pax, label="weight")
    ax = axes[0, 0]
    im = ax.imshow(w, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(candidates)), candidates)
    ax.set_xticks(range(t), behaviours, rotation=75, ha="right", fontsize=7)
    ax.set_xlabel("behaviours of the user, oldest → most recent (item · category)")
    ax.set_ylabel("candidate (item · category)")
    ax.set_title(f"{model.upper()}: {WHAT[model]}, {who}")
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
