"""The import rule of the packages, read from the source (tools.import_graph walks every module's
AST), as torchrec's code-quality tests do:

    embedding  imports nothing of the project but trainer.config and trainer.storage (the bottom)
    trainer    imports nothing from launch or tools
    launch     imports tools only in launch.cli, and only the commands it dispatches
    tools      imports launch.launcher only (the one way to start training), never the CLI

no module imports itself back through others (top-level and in-function imports alike), and an
import inside a function is kept to the modules `dinrec --help` loads (whose heavy layers wait
until a command runs); that the parser indeed loads neither torchrec nor Ray is checked too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tools.import_graph import Import, cycles, imports, package

DISPATCHED = {
    "tools.generate",
    "tools.convert",
    "tools.deepctr_experiment",
    "tools.bench",
    "tools.regularization",
    "tools.dien_experiment",
    "tools.movielens_experiment",
    "tools.zoo_experiment",
    "tools.attention_plot",
}


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    found = imports()
    assert len(found) > 50  # the walk sees the project (a broken walk would pass every rule)
    return found


def where(e: Import) -> str:
    return f"{e.importer} (line {e.line}) imports {e.imported}"


def test_embedding_imports_only_the_config_and_storage(edges):
    bad = [
        where(e)
        for e in edges
        if (
            package(e.importer) == "embedding"
            and package(e.imported) != "embedding"
            and e.imported not in ("trainer.config", "trainer.storage")
        )
    ]
    assert not bad, bad


def test_trainer_imports_neither_launch_nor_tools(edges):
    bad = [where(e) for e in edges if package(e.importer) == "trainer" and package(e.imported) in ("launch", "tools")]
    assert not bad, bad


def test_launch_imports_tools_only_to_dispatch_commands(edges):
    bad = [
        where(e)
        for e in edges
        if package(e.importer) == "launch"
        and package(e.imported) == "tools"
        and (e.importer != "launch.cli" or e.imported not in DISPATCHED)
    ]
    assert not bad, bad


def test_tools_start_training_through_the_launcher_only(edges):
    bad = [
        where(e)
        for e in edges
        if package(e.importer) == "tools" and package(e.imported) == "launch" and e.imported != "launch.launcher"
    ]
    assert not bad, bad


def test_no_import_cycles(edges):
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    a_b = [Import("a", "b", 1, True), Import("b", "c", 1, False), Import("c", "a", 1, True), Import("c", "d", 1, True)]
    assert cycles(a_b) == [["a", "b", "c", "a"]]


def test_in_function_imports_only_on_the_cli_start_up_path(edges):
    start_up, todo = set(), ["launch.cli"]
    while todo:  # launch.cli and every project module it loads at import, transitively
        m = todo.pop()
        if m not in start_up:
            start_up.add(m)
            todo += [e.imported for e in edges if e.importer == m and e.top_level]
    bad = [where(e) + " inside a function" for e in edges if not e.top_level and e.importer not in start_up]
    assert not bad, bad


def test_cli_parser_loads_neither_torchrec_nor_ray():
    code = (
        "import sys, launch.cli; launch.cli._parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchrec', 'ray', 'fbgemm_gpu'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
