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
    processes have loaded.
    """
    from torch.utils import cpp_extension

    cflags = ["-O3", *flags]
    ldflags = ["-fopenmp"] if "-fopenmp" in flags else []
    digest = hashlib.sha256(src.read_bytes() + repr((str(src.resolve()), cflags, ldflags)).encode()).hexdigest()[:12]
    return cpp_extension.load(
        name=f"{prefix}_{digest}", sources=[str(src)], extra_cflags=cflags, extra_ldflags=ldflags, verbose=False
    )
