"""The C++ extensions are cached by content: the same kernel source at another path (another
checkout, the working-directory copy of every `ray job submit`) loads the library already built
instead of compiling it again; an edited source builds a library of its own."""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from embedding import cpp
from trainer.models import jagged


def library(module) -> Path:
    return Path(module.__file__)


HEADER = jagged.SOURCE.with_name("bf16.h")  # the kernel's own header, included with quotes


def _copy(dst: Path, source: bytes = jagged.SOURCE.read_bytes(), header: bytes = HEADER.read_bytes()) -> Path:
    dst.mkdir(parents=True)
    (dst / HEADER.name).write_bytes(header)
    (dst / "jagged.cpp").write_bytes(source)
    return dst / "jagged.cpp"


def test_the_same_source_at_another_path_reuses_the_built_library(tmp_path):
    assert b'#include "bf16.h"' in jagged.SOURCE.read_bytes()
    built = library(jagged.kernel())
    mtime = built.stat().st_mtime_ns
    again = library(cpp.load(_copy(tmp_path / "elsewhere"), "dinrec_jagged", jagged.FLAGS))
    assert again == built
    assert built.stat().st_mtime_ns == mtime  # not rebuilt


def test_an_edited_source_or_header_is_another_library(tmp_path):
    built = library(jagged.kernel()).parent.name  # the build directory is named for the library
    same = _copy(tmp_path / "same")
    source = _copy(tmp_path / "source", source=jagged.SOURCE.read_bytes() + b"\n// edited\n")
    header = _copy(tmp_path / "header", header=HEADER.read_bytes() + b"\n// edited\n")
    assert cpp.name_of(same, "dinrec_jagged", jagged.FLAGS) == built
    assert cpp.name_of(source, "dinrec_jagged", jagged.FLAGS) != built
    assert cpp.name_of(header, "dinrec_jagged", jagged.FLAGS) != built


# A module of no torch code: it compiles in a second or two, so the lock tests build for real.
TINY = b"""#include <Python.h>
#define STR_(x) #x
#define STR(x) STR_(x)
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), NULL, -1, NULL};
PyMODINIT_FUNC CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
"""


def _tiny(tmp_path) -> tuple[Path, Path, dict]:
    src = tmp_path / "tiny.cpp"
    src.write_bytes(TINY)
    root = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    return src, root / cpp.name_of(src, "dinrec_tiny"), env


def _load(src: Path, env: dict, stdout=subprocess.PIPE) -> subprocess.Popen:
    load = f"cpp.load(Path({str(src)!r}), 'dinrec_tiny')"
    code = f"from pathlib import Path; from embedding import cpp; print({load}.__file__)"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)


def test_a_lock_left_by_a_killed_build_does_not_stop_the_next(tmp_path):
    """torch waits on its lock file for as long as it exists; a build killed by a signal leaves
    it, and without our lock every later build would wait forever (the timeout fails it here)."""
    src, build, env = _tiny(tmp_path)
    build.mkdir(parents=True)
    (build / "lock").touch()  # what a build killed by SIGKILL or SIGTERM leaves
    proc = _load(src, env)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert Path(out.strip()).parent == build
    assert not (build / "lock").exists()


def test_a_build_in_progress_is_waited_for(tmp_path):
    """While another process holds the build (our lock), its torch lock file is live: the second
    process waits, and builds (or loads) once the first lets go."""
    src, build, env = _tiny(tmp_path)
    build.mkdir(parents=True)
    with open(build / ".dinrec-build.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").touch()  # the first process's torch lock, live
        out = tmp_path / "stdout"
        proc = _load(src, env, stdout=out.open("w"))
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()
        try:  # a bounded wait: a test of waiting must not wait forever itself
            while "waiting for another process" not in lines.get(timeout=60):
                pass
        except queue.Empty:
            proc.kill()
            raise AssertionError("no line saying that the second process waits") from None
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting
        assert (build / "lock").exists()  # not taken for stale
        (build / "lock").unlink()  # the first process ends its build
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert Path(out.read_text().strip()).parent == build


def test_without_file_locks_the_build_runs_under_torchs_lock_and_says_so(tmp_path, monkeypatch, capsys):
    src, build, env = _tiny(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    module = cpp.load(src, "dinrec_tiny")
    assert Path(module.__file__).parent == build
    assert "cannot lock" in capsys.readouterr().err
