"""What a user meets on bad input: one line and exit 2, nothing lost, nothing silently accepted.

Damaged checkpoints (every file of one, truncated, deleted or with a byte flipped) under `eval`,
`--resume DIR` and `--resume latest`; a missing or bad test set; data with no rows; a progress bar
open when the error comes; refused resumes and reused run directories; dims FBGEMM cannot take;
argument errors. (A bad row group under the Ray launcher: tests/launch/test_launchers.py; a
damaged checkpoint at a Ray restart: tests/trainer/test_checkpoint.py.)
"""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.cli import main
from tests.conftest import tiny_argv
from trainer import checkpoint

CKPT = "step-000000010"  # the newest checkpoint of the run below; step-000000005 before it


args = tiny_argv


RUN = ["train.epochs=1", "train.limit_batches=10", "train.checkpoint_every=5", "train.keep_checkpoints=0"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    """A finished run with checkpoints at steps 5 and 10 (the final one)."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", *args(tiny_data, out, *RUN)]) == 0
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-000000005", CKPT]
    return out


def damage(path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # one byte flipped in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


FILES = [".metadata", "__0_0.distcp", "config.yaml", "manifest.json"]


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_checkpoint_is_refused_in_one_line_and_skipped_for_latest(run_dir, tmp_path, capsys, name, how):
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    target = out / "checkpoints" / CKPT
    damage(target / name, how)
    # eval of that checkpoint: refused, the file named
    assert main(["eval", "--checkpoint", str(target), "--no-progress"]) == 2
    line = error_line(capsys)
    assert line.startswith("dinrec eval: error: ") and (name in line or "incomplete checkpoint" in line), line
    # eval of the run directory: the newest intact checkpoint, saying which one it skipped
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["checkpoint"].endswith("step-000000005") and result["step"] == 5
    if name != "manifest.json" or how != "deleted":  # without its manifest the directory is no checkpoint
        assert [s["checkpoint"] for s in result["skipped_checkpoints"]] == [str(target)]
        assert captured.err.count("skipped the damaged checkpoint") == 1


@pytest.mark.parametrize("name", FILES)
def test_resume_from_a_damaged_checkpoint_is_refused_and_latest_skips_it(run_dir, tiny_data, tmp_path, capsys, name):
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    target = out / "checkpoints" / CKPT
    damage(target / name, "flipped")
    config_before = (out / "config.yaml").read_text()
    assert main(["train", *args(tiny_data, out, *RUN), "--resume", str(target)]) == 2
    assert error_line(capsys).startswith("dinrec train: error: ")
    assert (out / "config.yaml").read_text() == config_before
    # --resume latest: from step 5, one more epoch
    assert main(["train", *args(tiny_data, out, *RUN, "train.epochs=2"), "--resume"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("skipped the damaged checkpoint") == 1
    segments = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "segment" in r]
    assert [s["segment"] for s in segments] == [1, 2]
    assert segments[1]["resumed_from"].endswith("step-000000005")
    assert [s["checkpoint"] for s in segments[1]["skipped_checkpoints"]] == [str(target)]
    assert segments[1]["config"]["train"]["epochs"] == 2 and segments[0]["config"]["train"]["epochs"] == 1


def test_the_damaged_step_is_written_again_on_resume(run_dir, tiny_data, tmp_path, capsys):
    """Resumed from step 5, the run reaches step 10 again: it replaces the damaged checkpoint there
    instead of keeping it as 'saved already'."""
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    target = out / "checkpoints" / CKPT
    damage(target / "__0_0.distcp", "flipped")
    assert main(["train", *args(tiny_data, out, *RUN), "--resume"]) == 0
    capsys.readouterr()
    checkpoint.verify(target)  # intact again
    a, b = checkpoint.read_tensors(run_dir / "checkpoints" / CKPT), checkpoint.read_tensors(target)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_missing_test_set_stops_before_training(tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *args(tiny_data, out), f"data.test={tmp_path / 'nope'}"]) == 2
    assert error_line(capsys) == f"dinrec train: error: {tmp_path / 'nope'}: no Parquet files found"
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_a_bad_test_row_group_found_at_the_final_eval_keeps_the_training(tiny_data, tmp_path, capsys):
    bad = tmp_path / "test"
    bad.mkdir()
    t = pq.read_table(tiny_data / "test" / "part-001.parquet")
    lab = t["label"].to_numpy().copy()
    lab[-1] = 3
    pq.write_table(t.set_column(0, "label", pa.array(lab)), bad / "x.parquet", row_group_size=100)
    out = tmp_path / "r"
    assert main(["train", *args(tiny_data, out, *RUN), f"data.test={bad}"]) == 2
    assert "x.parquet: row group" in error_line(capsys)
    assert [Path(c).name for c in checkpoint.list_checkpoints(out / "checkpoints")][-1] == CKPT  # the final one


@pytest.mark.parametrize("split", ["train", "test"])
def test_data_with_no_rows_stops_at_once(tiny_data, tmp_path, capsys, split):
    empty = tmp_path / "empty"
    empty.mkdir()
    t = pq.read_table(tiny_data / split / "part-000.parquet")
    pq.write_table(t.slice(0, 0), empty / "x.parquet")
    out = tmp_path / "r"
    assert main(["train", *args(tiny_data, out), f"data.{split}={empty}"]) == 2
    assert error_line(capsys) == f"dinrec train: error: data.{split}: no rows in 1 file(s): {empty / 'x.parquet'}"
    assert not out.exists()


def test_an_error_while_a_progress_bar_is_open_starts_its_own_line(tiny_data, tmp_path, capsys):
    bad = tmp_path / "train"
    bad.mkdir()
    t = pq.read_table(tiny_data / "train" / "part-000.parquet")
    lab = t["label"].to_numpy().copy()
    lab[-1] = 7
    pq.write_table(t.set_column(0, "label", pa.array(lab)), bad / "x.parquet", row_group_size=100)
    argv = [a for a in args(tiny_data, tmp_path / "r", f"data.train={bad}") if a != "--no-progress"]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "epoch 0" in err  # the bar was open
    assert "\ndinrec train: error: " in err and err.rstrip().splitlines()[-1].startswith("dinrec train: error: ")


def test_a_refused_resume_leaves_the_run_directory_as_it_was(run_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(run_dir, out)
    before = {f: (out / f).read_text() for f in ("config.yaml", "metrics.jsonl")}
    assert main(["train", *args(tiny_data, out, *RUN), "--resume", "dense_optimizer.lr=0.5"]) == 2
    assert "checkpoint of another config: dense_optimizer.lr" in error_line(capsys)
    # and one that fails on bad data before its first step
    assert main(["train", *args(tiny_data, out, *RUN), "--resume", f"data.test={tmp_path / 'nope'}"]) == 2
    assert "no Parquet files found" in error_line(capsys)
    assert {f: (out / f).read_text() for f in before} == before


@pytest.mark.parametrize("left", [("metrics.jsonl", "config.yaml"), ("config.yaml",), ("metrics.jsonl",)])
def test_a_new_run_refuses_an_out_dir_with_an_earlier_runs_files(run_dir, tiny_data, tmp_path, capsys, left):
    out = tmp_path / "r"
    out.mkdir()
    for f in left:
        shutil.copy(run_dir / f, out / f)
    before = {f: (out / f).read_text() for f in left}
    assert main(["train", *args(tiny_data, out, *RUN)]) == 2
    line = error_line(capsys)
    assert "of an earlier run (no checkpoint)" in line and all(f in line for f in left), line
    assert {f: (out / f).read_text() for f in left} == before


@pytest.mark.parametrize("dim, hint", [(18, "16 or 20"), (2, "4"), (7, "4 or 8")])
def test_a_dim_fbgemm_cannot_take_is_one_line(tiny_data, tmp_path, capsys, dim, hint):
    assert main(["train", *args(tiny_data, tmp_path / "r"), f"tables.0.dim={dim}"]) == 2
    assert error_line(capsys) == (
        f"dinrec train: error: tables.0.dim: {dim}: FBGEMM's embedding kernels take dims that are multiples of 4 "
        f"({hint})"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--config", "c.yaml", "--world-size", "abc"], "argument --world-size: invalid int value: 'abc'"),
        (["trian"], "argument COMMAND: invalid choice: 'trian'"),
        (["train"], "the following arguments are required: --config"),
        (["train", "--config", "c.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = error_line(capsys)
    assert line.startswith("dinrec") and message in line, line
