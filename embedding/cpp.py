"""Our C++ extensions (the MBA CPU kernel, DIEN's GRU sequence kernel): compiled by torch's
cpp_extension on first use and cached (`make setup` builds them ahead)."""

from __future__ import annotations

import hashlib
import os
import re
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path


@cache
def load(src: Path, prefix: str, flags: tuple[str, ...] = ()):
    """Build (once per source version) and import the extension in `src`.

    The library is addressed by its content (`name_of`) and compiled from a copy of the source
    kept in its build directory. An edited kernel builds into a directory of its own instead of
    rewriting a library that running processes have loaded, and the same source at another path
    (another checkout, the copy of the working directory that `ray job submit` gives every job)
    loads the library already built instead of compiling again (ninja rebuilds when a source path
    in its command line changes). The headers that `src` includes with quotes (`#include "x.h"`,
    beside it) are part of its content: they are copied with it and hashed into the name.
    """
    from torch.utils import cpp_extension

    cflags, ldflags = _flags(flags)
    name = name_of(src, prefix, flags)
    build = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    build.mkdir(parents=True, exist_ok=True)
    for file in _files(src):  # each written once, atomically: a newer mtime would make ninja rebuild
        copy = build / file.name
        if not copy.exists():
            tmp = build / f".{file.name}.{os.getpid()}"
            tmp.write_bytes(file.read_bytes())
            os.replace(tmp, copy)
    source = build / src.name
    with _build_lock(build), _our_ninja():
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build),
            verbose=False,
        )


@contextmanager
def _build_lock(build: Path):
    """Held while torch builds or loads the library in `build`, one process at a time.

    torch's own lock is a file (`build/lock`) that a build killed by a signal (a preempted
    worker, a CI job stopped mid-setup) leaves behind, and every later process then waits on it
    forever. Ours is an flock, which the kernel drops with its process: whoever holds it knows
    that no other build is running, so a torch lock file found then is stale and is removed.
    """
    import fcntl

    with open(build / ".dinrec-build.lock", "a") as held:
        try:
            if not _locked_within(held, seconds=2.0):  # workers starting together load in turn quietly
                print(f"dinrec: waiting for another process building {build}", file=sys.stderr, flush=True)
                fcntl.flock(held, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: torch's lock file alone, as before
            print(
                f"dinrec: cannot lock {held.name} ({e.strerror}); building under torch's lock file only",
                file=sys.stderr,
                flush=True,
            )
            yield
            return
        stale = build / "lock"
        if stale.exists():
            print(f"dinrec: removing {stale}, left by a build that was killed", file=sys.stderr, flush=True)
            stale.unlink(missing_ok=True)
        yield  # the flock goes with the file's closing


def _locked_within(held, seconds: float) -> bool:
    """Whether the exclusive flock on `held` was taken within `seconds` (polled)."""
    import fcntl
    import time

    end = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.05)


@contextmanager
def _our_ninja():
    """PATH with the pinned `ninja` package's binary first while torch runs `ninja`: a ninja of
    another version (the system's) finds the build log in a format it does not read and
    rebuilds everything; which one PATH named first depended on how the process was started."""
    import ninja

    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _flags(flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    return ["-O3", *flags], ["-fopenmp"] if "-fopenmp" in flags else []


def name_of(src: Path, prefix: str, flags: tuple[str, ...] = ()) -> str:
    """The library's name: `prefix`, then a hash of the source and its headers, the flags, torch's
    and Python's versions and, with `-march=native`, the CPU's model and instruction sets (so that
    machines of another kind that share the cache build their own); not the source's path."""
    import torch

    cflags, ldflags = _flags(flags)
    cpu = _cpu_kind() if "-march=native" in flags else ""
    key = repr((cflags, ldflags, cpu, torch.__version__, sys.version_info[:2])).encode()
    digest = hashlib.sha256(key)
    for file in _files(src):
        digest.update(f"\0{file.name}\0".encode() + file.read_bytes())
    return f"{prefix}_{digest.hexdigest()[:12]}"


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"/]+)"', re.M)


def _files(src: Path) -> list[Path]:
    """`src`, then the headers it includes with quotes from its own directory, and theirs."""
    files, todo = [src], [src]
    while todo:
        for name in _LOCAL_INCLUDE.findall(todo.pop().read_bytes()):
            header = src.with_name(name.decode())
            if header not in files:
                files.append(header)
                todo.append(header)
    return files


def _cpu_kind() -> str:
    """The CPU's model name and flags (Linux), else the platform's processor string."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))  # the first core's lines (every core repeats them)
