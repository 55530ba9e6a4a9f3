"""Metrics against independent references: brute-force pair counts, per-user loops, sklearn."""

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from trainer.metrics import auc, gauc, logloss, rela_impr


def brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_count_and_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = np.round(rng.random(400) + 0.3 * y, 1)  # coarse rounding: many ties
    assert auc(y, s) == pytest.approx(brute_auc(y, s), abs=1e-12)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_one_class_is_nan():
    assert np.isnan(auc(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize("seed", range(5))
def test_gauc_is_impression_weighted_per_user_auc(seed):
    rng = np.random.default_rng(seed)
    n = 600
    users = rng.integers(0, 40, n)
    y = rng.integers(0, 2, n)
    y[users == 3] = 1  # one-class users are left out
    y[users == 7] = 0
    s = np.round(rng.random(n) + 0.2 * y, 1)
    num = den = 0.0
    counted = 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * brute_auc(y[m], s[m])
            den += m.sum()
            counted += 1
    g, k = gauc(y, s, users)
    assert g == pytest.approx(num / den, abs=1e-12)
    assert k == counted


def test_gauc_all_one_class_is_nan():
    g, k = gauc(np.array([1, 1, 0]), np.array([0.1, 0.2, 0.3]), np.array([1, 1, 2]))
    assert np.isnan(g) and k == 0


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_rela_impr_paper_table3():
    # DIN vs BaseModel on MovieLens in the paper's Table 3: 0.7337 vs 0.7300 -> 1.61 %.
    assert rela_impr(0.7337, 0.7300) == pytest.approx(1.61, abs=0.005)
    assert rela_impr(0.73, 0.73) == 0.0
