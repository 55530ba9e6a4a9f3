"""What the `dinrec experiment …` runners share: their common options, seed and variant lists,
mean ± std and its Markdown, the oracle line, figures."""

from __future__ import annotations

import shutil
import statistics

from trainer.config import ConfigError


def add_common_arguments(p, out: str, plot: str, runs: str) -> None:
    """The options every experiment with a table and a plot takes: seeds, the Markdown table, the
    PNG, where the runs go, and config overrides for every run."""
    p.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: %(default)s)")
    p.add_argument("--out", default=None, help=f"also write a Markdown table here (e.g. {out})")
    p.add_argument("--plot", default=None, help=f"a PNG plot (e.g. {plot})")
    p.add_argument("--runs", default=runs, help="run directories go here (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def figure(figsize: tuple[float, float]):
    """A new matplotlib figure and axes, drawn off screen (Agg): matplotlib loads only here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=120)


def save_figure(fig, path) -> None:
    """Lay out, write the PNG (its directory made first) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def fresh(cfg):
    """`cfg`, its train.out_dir removed first: an experiment's runs start over every time (a
    run directory with checkpoints is otherwise refused, see trainer.resume.resume_point)."""
    shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
    return cfg


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"experiment: --seeds {text!r}: expected e.g. 0,1,2") from None


def parse_variants(text: str, known, flag: str = "--variants") -> list[str]:
    variants = text.split(",")
    bad = [v for v in variants if v not in known]
    if bad:
        raise ConfigError(f"experiment: {flag}: unknown {bad[0]!r} (choose from {', '.join(known)})")
    return variants


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pm(pair: tuple[float, float], digits: int = 4) -> str:
    """A (mean, std) pair as Markdown: "0.7705 ± 0.0038"."""
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def oracle_lines(out: dict) -> list[str]:
    """The generator's oracle AUC (from the first run), when the data has one."""
    oracle = next(iter(out["runs"].values()))[0].get("oracle_auc")
    return (
        ["", f"The generator's own click probabilities reach a test AUC of {oracle:.4f} (the oracle)."]
        if oracle
        else []
    )
