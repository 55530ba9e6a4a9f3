import pytest

from tests.conftest import ROOT
from trainer.config import Config, ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


TABLES = """tables:
  - {name: item, num_rows: 10, dim: 4, features: [item_id, hist_item_id]}
"""


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_config_is_shipped_and_checked():
    assert len(SHIPPED) >= 10  # the glob sees the configs directory


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_and_states_only_what_differs_from_the_defaults(path):
    import yaml

    cfg = load_config(path)
    assert cfg.tables[0].features[:2] == ["item_id", "hist_item_id"]
    defaults = _leaves(Config().to_dict())
    stated = _leaves({k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "tables"})
    same = [k for k, v in stated.items() if k in defaults and defaults[k] == v]
    assert not same, f"{path.name} restates defaults: {same}"


def test_overrides_are_typed_and_checked(tmp_path):
    p = write(tmp_path, TABLES)
    cfg = load_config(p, ["train.epochs=3", "sparse_optimizer.lr=1", "tables.0.dim=8", "model.mlp=[4, 2]"])
    assert cfg.train.epochs == 3 and cfg.sparse_optimizer.lr == 1.0
    assert cfg.tables[0].dim == 8 and cfg.model.mlp == [4, 2]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (TABLES + "train: {epoch: 2}\n", [], "train.epoch: unknown key"),
        (TABLES + "train: {epochs: two}\n", [], "train.epochs: expected int, got str"),
        (TABLES + "model: {name: gpt}\n", [], 'model.name: str "gpt" is not one of lr|base|wide_deep'),
        (TABLES, ["train.epochs=1.5"], "train.epochs: expected int, got float"),
        (TABLES, ["tables.3.dim=1"], "tables.3: list index '3' out of range"),
        (TABLES, ["data.batch_size=0"], "data.batch_size: must be > 0"),
        (
            TABLES,
            ["sparse_optimizer.type=sgd_mba", "sparse_optimizer.kernel=fbgemm"],
            "sparse_optimizer.kernel: fbgemm has no MBA update (type 'sgd_mba': auto, cpp or triton)",
        ),
        (
            TABLES,
            ["model.attention_kernel=fused", "model.activation=dice"],
            "model.attention_kernel: fused takes PReLU, not activation 'dice'",
        ),
        (TABLES, ["nonsense"], "expected key.path=value"),
        (
            "tables:\n  - {name: item, num_rows: 10, dim: 4, features: [hist_item_id]}\n",
            [],
            "needs its candidate feature 'item_id'",
        ),
        (
            "tables:\n  - {name: item, dim: 4, features: [item_id, hist_item_id]}\n",
            [],
            "tables.0.num_rows: required key missing",
        ),
        (
            TABLES + "  - {name: c, num_rows: 3, dim: 4, features: [item_id]}\n",
            [],
            "feature 'item_id' already read by table 'item'",
        ),
        ("data: [1]\n" + TABLES, [], "data: expected a mapping"),
        (TABLES + "train: {epochs: true}\n", [], "train.epochs: expected int, got bool"),
    ],
)
def test_bad_config_one_line_with_path(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: line 2 invalid YAML"):
        load_config(write(tmp_path, "a: 1\nb: c: d\n"))
