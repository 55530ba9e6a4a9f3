"""Exact CTR metrics over a whole evaluation set (DIN paper §6.3).

AUC counts tied scores as half a correctly ordered pair (average ranks). GAUC is the paper's
Eq. 10: the impression-weighted mean of per-user AUC, over users who have both a click and a
non-click (a one-class user has no AUC). RelaImpr is Eq. 11.

torchrec.metrics.GAUCMetric is not used: it averages per-session AUC unweighted, breaks ties by
sort order and needs each session contiguous in a batch, so it is not Eq. 10.
"""

from __future__ import annotations

import numpy as np


def _average_ranks(sorted_keys: list[np.ndarray]) -> np.ndarray:
    """1-based ranks of already-sorted rows, ties (equal in every key) sharing their mean rank."""
    n = sorted_keys[0].size
    change = np.zeros(n, bool)
    change[0] = True
    for k in sorted_keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of start+1 .. end
    return np.repeat(mean_rank, ends - starts)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; nan when only one class is present."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = _average_ranks([scores[order]])
    rank_sum = ranks[labels[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> tuple[float, int]:
    """Eq. 10: (sum_u n_u * AUC_u) / (sum_u n_u) over users with both labels; also their count."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    users = np.asarray(users).ravel()
    if labels.size == 0:
        return float("nan"), 0
    order = np.lexsort((scores, users))  # by user, then score
    u, s, y = users[order], scores[order], labels[order]
    first = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    size = np.diff(np.append(first, u.size))
    ranks = _average_ranks([u, s]) - np.repeat(first, size)  # rank within the user
    n_pos = np.add.reduceat(y.astype(np.int64), first)
    n_neg = size - n_pos
    pos_rank_sum = np.add.reduceat(np.where(y, ranks, 0.0), first)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan"), 0
    user_auc = (pos_rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    weight = size[ok].astype(np.float64)
    return float((weight * user_auc).sum() / weight.sum()), int(ok.sum())


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood (paper Eq. 2); probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def rela_impr(auc_model: float, auc_base: float) -> float:
    """Eq. 11, in percent: relative improvement over a base model, measured from AUC 0.5."""
    return ((auc_model - 0.5) / (auc_base - 0.5) - 1.0) * 100.0


def summarize(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    g, n_users = gauc(labels, probs, users)
    return {
        "auc": auc(labels, probs),
        "gauc": g,
        "gauc_users": n_users,
        "logloss": logloss(labels, probs),
        "samples": int(np.asarray(labels).size),
        "ctr": float(np.asarray(labels, dtype=np.float64).mean()) if np.size(labels) else float("nan"),
    }
