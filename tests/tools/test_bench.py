"""The benchmarks run on the tiny data and report what they claim (figures are not asserted)."""

import json

from launch.cli import main
from tests.conftest import ROOT

BEHAVIOUR_ONLY = (
    "tables=[{name: item, num_rows: 500, dim: 8, features: [item_id, hist_item_id]}, "
    "{name: cate, num_rows: 20, dim: 8, features: [cate_id, hist_cate_id]}]"
)


def run(capsys, *args) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_loader(tiny_data, capsys):
    r = run(
        capsys,
        "bench",
        "loader",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--batches",
        "20",
        "--train-steps",
        "10",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
    )
    assert r["loader_cores"] == 1 and r["loader_batches"] == 20 and r["loader_samples"] == 20 * 64
    assert r["loader_samples_per_s"] > 0 and r["train_samples_per_s"] > 0
    assert abs(r["loader_over_train"] - r["loader_samples_per_s"] / r["train_samples_per_s"]) < 0.02


def test_bench_train_against_reference(tiny_data, capsys):
    r = run(
        capsys,
        "bench",
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--steps",
        "5",
        "--warmup",
        "2",
        f"data.train={tiny_data / 'train'}",
        BEHAVIOUR_ONLY,
        "sparse_optimizer.type=sgd",
        "model.activation=prelu",  # the fused attention unit takes PReLU
    )
    assert r["dinrec_samples_per_s"] > 0 and r["reference_samples_per_s"] > 0
    assert abs(r["ratio_dinrec_over_reference"] - r["dinrec_samples_per_s"] / r["reference_samples_per_s"]) < 0.002
    assert r["rounds"] == 5 and len(r["ratio_per_round"]) == 5  # one batch per round, alternating
    plain = r["dinrec_plain_loop_samples_per_s"]
    assert plain > 0 and abs(r["ratio_pipeline_over_plain_loop"] - r["dinrec_samples_per_s"] / plain) < 0.002
    by = r["samples_per_s_by_precision"]
    assert by["fp32"] == r["dinrec_samples_per_s"] and by["bf16"] > 0  # the config's fp32, and bf16 beside it
    assert abs(r["ratio_bf16_over_fp32"] - by["bf16"] / by["fp32"]) < 0.002
    c = r["samples_per_s_by_compile"]
    assert r["compile"] is False and c["eager"] == r["dinrec_samples_per_s"] and c["compiled"] > 0
    assert abs(r["ratio_compiled_over_eager"] - c["compiled"] / c["eager"]) < 0.002
    k = r["samples_per_s_by_attention_kernel"]  # PReLU in fp32: the fused unit, and the layers beside it
    assert r["attention_kernel"] == "fused" and k["fused"] == r["dinrec_samples_per_s"] and k["layers"] > 0
    assert abs(r["ratio_fused_over_layers"] - k["fused"] / k["layers"]) < 0.002
    e = r["samples_per_s_by_sparse_kernel"]  # SGD on sequence tables: ours by default, FBGEMM's beside it
    assert e["ours"] == r["dinrec_samples_per_s"] and e["fbgemm"] > 0
    assert abs(r["ratio_ours_over_fbgemm_sparse"] - e["ours"] / e["fbgemm"]) < 0.002


def test_bench_train_times_every_model_against_din(tiny_zoo_data, capsys):
    from tests.conftest import ZOO_GROUPS, ZOO_TABLES
    from trainer.models import MODELS

    r = run(
        capsys,
        "bench",
        "train",
        "--models",
        "all",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--steps",
        "4",
        "--warmup",
        "1",
        "--rounds",
        "2",
        f"data.train={tiny_zoo_data / 'train'}",
        ZOO_TABLES,
        *ZOO_GROUPS,
    )
    assert r["bench"] == "train_models" and list(r["models"]) == list(MODELS) and r["rounds"] == 2
    din = r["models"]["din"]["samples_per_s"]
    assert r["models"]["din"]["ratio_to_din"] == 1.0
    for m in r["models"].values():
        assert m["samples_per_s"] > 0 and abs(m["ratio_to_din"] - m["samples_per_s"] / din) < 0.002


def test_bench_train_compares_the_sparse_kernels_per_model(tiny_data, capsys):
    """--compare-sparse: each model also with its embedding update on FBGEMM's kernels, in the same
    blocks; the ratio is the two rates' (and is refused without --models)."""
    args = ["--config", str(ROOT / "configs/tiny.yaml"), f"data.train={tiny_data / 'train'}"]
    r = run(
        capsys,
        "bench",
        "train",
        "--models",
        "base",
        "--compare-sparse",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--rounds",
        "2",
        *args,
    )
    assert r["sparse_kernel"] == "ours" and list(r["models"]) == ["base", "din"]
    for m in r["models"].values():
        by = m["samples_per_s_by_sparse_kernel"]
        assert by["ours"] == m["samples_per_s"] and by["fbgemm"] > 0
        assert abs(m["ratio_ours_over_fbgemm_sparse"] - by["ours"] / by["fbgemm"]) < 0.002
    assert main(["bench", "train", "--compare-sparse", *args]) == 2
    assert "--compare-sparse goes with --models" in capsys.readouterr().err


def test_bench_train_refuses_a_mismatched_config(tiny_data, capsys):
    assert (
        main(["bench", "train", "--config", str(ROOT / "configs/tiny.yaml"), f"data.train={tiny_data / 'train'}"]) == 2
    )
    assert "pooled" in capsys.readouterr().err


def test_bench_embedding_small(capsys):
    r = run(
        capsys,
        "bench",
        "embedding",
        "--rows",
        "4096",
        "--dims",
        "8,16",
        "--batch",
        "64",
        "--ids",
        "10",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--kernels",
        "auto,cpp",
    )
    assert [x["dim"] for x in r["results"]] == [8, 16] and r["mba_kernel_auto"] == "cpp"
    for x in r["results"]:
        assert x["a_fbgemm_exact_sgd_ms"] > 0 and x["b_mba_cpp_ms"] > 0
        assert abs(x["b_over_a"] - x["b_mba_auto_ms"] / x["a_fbgemm_exact_sgd_ms"]) < 0.01
        assert abs(x["c_over_b"] - x["c_torch_sparse_sgd_l2_ms"] / x["b_mba_auto_ms"]) < 0.01


def test_bench_embedding_refuses_bad_dims(capsys):
    assert main(["bench", "embedding", "--dims", "6"]) == 2
    assert "divisible by 4" in capsys.readouterr().err


def test_bench_dien_against_din_and_the_step_loop(tiny_data, capsys):
    r = run(
        capsys,
        "bench",
        "dien",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--steps",
        "4",
        "--warmup",
        "1",
        f"data.train={tiny_data / 'train'}",
        "model.name=dien",
    )
    rates = r["samples_per_s"]
    assert set(rates) == {"din", "dien", "dien_step_loop"} and min(rates.values()) > 0
    assert abs(r["dien_over_din"] - rates["dien"] / rates["din"]) < 0.01
    assert r["evolution"] == "augru" and r["steps"] == 4
    assert (
        main(["bench", "dien", "--config", str(ROOT / "configs/tiny.yaml"), f"data.train={tiny_data / 'train'}"]) == 2
    )
    assert "model.name must be dien" in capsys.readouterr().err


def test_bench_e2e_parquet_against_in_memory_with_loader_workers(tiny_data, capsys):
    r = run(
        capsys,
        "bench",
        "e2e",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--steps",
        "12",
        "--warmup",
        "3",
        f"data.train={tiny_data / 'train'}",
        f"data.test={tiny_data / 'test'}",
        "data.loader_workers=1",
    )
    rates = r["samples_per_s"]
    assert set(rates) == {"in_memory", "parquet"} and min(rates.values()) > 0
    assert abs(r["parquet_over_in_memory"] - rates["parquet"] / rates["in_memory"]) < 0.01
    assert r["loader_workers"] == 1 and r["device"] == "cpu" and r["gpu_busy_fraction_from_parquet"] is None
