"""Our C++ extensions (the MBA CPU kernel, DIEN's GRU sequence kernel): compiled by torch's
cpp_extension on first use and cached (`make setup` builds them ahead)."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path


@cache
def load(src: Path, prefix: str, flags: tuple[str, ...] = ()):
    """Build (once per source version) and import the extension in `src`.

    The library name carries a hash of the source, its path and the flags: an edited kernel, or
    another checkout, builds into its own directory instead of rewriting a library that running
    processes have loaded. With `-march=native` it also carries the CPU's model and instruction
    sets, so that machines of another kind that share the cache build their own.
    """
    from torch.utils import cpp_extension

    cflags = ["-O3", *flags]
    ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
    cpu = _cpu_kind() if "-march=native" in flags else ""
    key = repr((str(src.resolve()), cflags, ldflags, cpu)).encode()
    digest = hashlib.sha256(src.read_bytes() + key).hexdigest()[:12]
    return cpp_extension.load(
        name=f"{prefix}_{digest}", sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags, verbose=False
    )


def _cpu_kind() -> str:
    """The CPU's model name and flags (Linux), else the platform's processor string."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))  # the first core's lines (every core repeats them)
