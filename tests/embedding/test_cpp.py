"""The C++ extensions are cached by content: the same kernel source at another path (another
checkout, the working-directory copy of every `ray job submit`) loads the library already built
instead of compiling it again; an edited source builds a library of its own."""

from __future__ import annotations

from pathlib import Path

from embedding import cpp
from trainer.models import jagged


def library(module) -> Path:
    return Path(module.__file__)


def test_the_same_source_at_another_path_reuses_the_built_library(tmp_path):
    built = library(jagged.kernel())
    mtime = built.stat().st_mtime_ns
    copy = tmp_path / "elsewhere" / "jagged.cpp"
    copy.parent.mkdir()
    copy.write_bytes(jagged.SOURCE.read_bytes())
    again = library(cpp.load(copy, "dinrec_jagged", jagged.FLAGS))
    assert again == built
    assert built.stat().st_mtime_ns == mtime  # not rebuilt


def test_an_edited_source_is_another_library(tmp_path):
    src = jagged.SOURCE.read_bytes()
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_bytes(src)
    b.write_bytes(src + b"\n// edited\n")
    built = library(jagged.kernel()).parent.name  # the build directory is named for the library
    assert cpp.name_of(a, "dinrec_jagged", jagged.FLAGS) == built
    assert cpp.name_of(b, "dinrec_jagged", jagged.FLAGS) != built
