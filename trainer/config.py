"""Experiment configuration: a frozen dataclass tree loaded from YAML with `a.b=value` overrides.

Unknown keys, wrong types and bad values fail at load with the dotted key path (ConfigError).
All defaults live here, in one place; a YAML file states only what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from embedding.layout import FeatureLayout, behaviour_of, candidate_of, is_negative


class ConfigError(ValueError):
    """A user error in a config file or override: one line, with the dotted key path."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "data/synthetic/train/*.parquet"  # file, directory or glob
    test: str = "data/synthetic/test/*.parquet"
    # a validation set (file, directory or glob; e.g. `dinrec generate --valid-users`), evaluated
    # after every epoch: the epoch of the best validation GAUC is the run's `best` (its
    # checkpoint also under train.out_dir/best), chosen without the test set
    valid: str | None = None
    batch_size: int = 256  # per rank
    max_hist_len: int = 50  # longer histories keep their most recent behaviours
    seed: int = 0  # row-group and row order per epoch
    dense_features: list[str] = field(default_factory=list)  # float32 columns
    # Feature groups (MIAN §3.1): the user-profile and the context features, each a sparse feature
    # that a table reads (int64 or list<int64>, not a candidate or behaviour) or one of
    # dense_features. MIAN's IUIM and ICIM attend over them field by field; the other models read
    # them as they read any other feature (a pooled embedding, or a dense input).
    profile: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    prefetch: int = 4  # batches prepared ahead by the background reader
    # processes that read and decode the training row groups ahead of the reader (0: the reader's
    # thread reads them); a GPU that trains faster than one core reads needs a few (docs/gpu.md)
    loader_workers: int = 0
    # DIEN's auxiliary-loss negatives when the files have no neg_hist_* columns, drawn per row
    # group for every behaviour from its other behaviours (never the behaviour's own item, unless
    # the row group has one item only): `frequency` picks a behaviour position uniformly, so
    # items come in proportion to how often they were clicked; `uniform` picks among the distinct
    # items equally.
    negatives: Literal["frequency", "uniform"] = "frequency"


@dataclass(frozen=True)
class TableConfig:
    name: str
    num_rows: int
    dim: int
    # Features that look the table up. `X` and `hist_X` in one table make a candidate/behaviour pair.
    features: list[str]
    id_map: Literal["identity", "hash"] = "identity"
    # Sharding types the planner may choose for this table (empty: any that fits).
    sharding_types: list[Literal["table_wise", "column_wise", "row_wise", "table_row_wise"]] = field(
        default_factory=list
    )
    # FBGEMM kernel: fused (weights in HBM on a GPU, DDR on the CPU); fused_uvm / fused_uvm_caching
    # keep the table in host memory (GPU only; MBA needs fused).
    compute_kernel: Literal["fused", "fused_uvm", "fused_uvm_caching"] = "fused"
    min_partition: int | None = None  # the planner's smallest column-wise shard width


@dataclass(frozen=True)
class ModelConfig:
    # the model zoo (docs/models.md): the DIN paper's baselines and DIN, DIEN, MIAN
    name: Literal["lr", "base", "wide_deep", "pnn", "deepfm", "dcn", "xdeepfm", "din", "dien", "mian"] = "din"
    attention_mlp: list[int] = field(default_factory=lambda: [80, 40])
    mlp: list[int] = field(default_factory=lambda: [200, 80])  # hidden sizes; the output is 1 logit
    activation: Literal["dice", "prelu"] = "prelu"
    # the model's dense part (attention, GRUs' projections, MLP) in fp32, or under bfloat16
    # autocast (fp32 weights, statistics, logits and loss); auto: bf16 on a CPU with AVX512-BF16
    # (where its GEMMs run about 6x fp32's), else fp32 (GPUs included: not measured there); see
    # docs/results.md "CPU speed"
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    # the model's dense part through torch.compile (inductor, dynamic shapes): its elementwise work
    # (casts, masks, the products and sums around the GEMMs) fused into generated C++ loops, with
    # our PReLU/Dice kernels, the GEMMs and the row gathers as calls between; the first steps
    # compile (tens of seconds, cached on disk for later runs); one graph per tower (tested),
    # except DIEN's and MIAN's on the CPU, which read the batch's longest history (on a GPU they
    # pad to data.max_hist_len: MIAN's is one graph, DIEN's breaks only around its GRU kernels);
    # see docs/results.md
    compile: bool = False
    # DIN's local activation unit: `fused`, with PReLU on the CPU one op forward and backward
    # (blocks of about 256 behaviours through every layer while in cache; trainer/models/attention.py);
    # `layers`, layer by layer (the reference); `auto`, fused on the CPU with PReLU in fp32, and
    # under bf16 where the CPU has AVX512-BF16 (the products as its bf16 pair products), else
    # layers; docs/results.md "CPU speed"
    attention_kernel: Literal["auto", "fused", "layers"] = "auto"
    # Dropout on behaviour ids (DIN §6.5 "randomly discard 50% of feature ids"): in training, each
    # id of the hist_* features is dropped with this probability.
    id_dropout: float = 0.0
    # DIEN (the DIEN paper, §4): the interest evolving layer's GRU, and α of Eq. 7, the weight of
    # the interest extractor's auxiliary loss (0: no auxiliary loss, no negatives looked up).
    # L_aux (Eq. 6) sums over the steps of a history, so it is about (mean history length) × a
    # per-step loss (chance: 2 log 2), many times the click loss: α is small (docs/dien.md).
    evolution: Literal["augru", "agru", "aigru"] = "augru"
    aux_loss: float = 0.05
    # σ(h_t, e) of Eq. 6: `inner`, the paper's inner product h_t·e (H = D); `mlp`, the authors'
    # released code's auxiliary network, BatchNorm → 100 → sigmoid → 50 → sigmoid → 1 logit on
    # [h_t, e], which does not force the interest state into the embedding space.
    aux_net: Literal["inner", "mlp"] = "inner"
    # Also feed DIEN's MLP the sum-pooled history and its product with the candidate, as the
    # authors' released DIEN code does (its MLP input: user, item, Σ history, item ⊙ Σ history,
    # final interest state); the paper's text names the final state only (false).
    history_sum: bool = True
    # DIEN's two GRUs: `auto`, the Triton sequence kernel on a GPU and the C++ one on the CPU;
    # `cpp`, the time loop in C++ (on a GPU: ATen ops per step); `triton`, the whole time loop in
    # one Triton kernel each way (GPU, or the CPU under TRITON_INTERPRET=1); `loop`, the Python
    # step loop through the cell (the reference; slower, see `dinrec bench dien`).
    gru_kernel: Literal["auto", "cpp", "triton", "loop"] = "auto"
    # Deep&Cross: the cross network's layers; `v1`, DCN's x_{l+1} = x_0 (x_lᵀ w_l) + b_l + x_l, or
    # `v2`, DCN-v2's x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l (torchrec's VectorCrossNet / CrossNet)
    cross_layers: int = 3
    cross: Literal["v1", "v2"] = "v1"
    # xDeepFM: the feature maps of each CIN layer
    cin_layers: list[int] = field(default_factory=lambda: [64, 64])
    # MIAN's IBIM: the Pre-LN Transformer's attention heads (they divide the behaviour width) and
    # its feed-forward hidden width (Eq. 5)
    heads: int = 2
    ffn: int = 64
    # MIAN's GIM (Eq. 15): `sum`, the weighted sum of the parts as written; `concat`, the weighted
    # parts side by side (docs/models.md)
    gim: Literal["sum", "concat"] = "sum"
    # MIAN's attention scores (Eq. 8, 10, 13, 15): 0, tanh(V·w + b) as printed (a scalar); A > 0,
    # uᵀ tanh(W V + b) with W of A rows (docs/models.md)
    score_hidden: int = 0
    # MIAN's local scores (Eq. 8, 10, 13) also see the candidate's product with the part,
    # γ([e_i, x, (e_i·Q) ⊙ x]) with Q learnt (a bilinear term; docs/models.md); false: as printed
    score_product: bool = False
    # MIAN's behaviour weights (Eq. 7): true, the softmax over the behaviours as printed; false,
    # exp(γ(V_t)) without the denominator, so that R_ibim keeps how many behaviours match (DIN §4.3)
    ibim_softmax: bool = True
    # MIAN's Transformer input (Eq. 3): `none`, the behaviour embeddings alone (the paper names no
    # position encoding); `recency`, plus a learnt embedding of each behaviour's place counted from
    # the most recent (0) back, as the Transformer adds positions to its inputs (docs/models.md)
    position: Literal["none", "recency"] = "none"


@dataclass(frozen=True)
class SparseOptimizerConfig:
    # *_mba: the same optimizer with mini-batch-aware L2 (DIN Eq. 7) on the rows each batch touches.
    # adam / partial_rowwise_adam: lazy Adam on the touched rows (FBGEMM's ADAM, PARTIAL_ROWWISE_ADAM:
    # m per element, v per element or per row), bias-corrected by the global step.
    type: Literal[
        "sgd",
        "rowwise_adagrad",
        "adam",
        "partial_rowwise_adam",
        "sgd_mba",
        "rowwise_adagrad_mba",
        "adam_mba",
        "partial_rowwise_adam_mba",
    ] = "rowwise_adagrad"
    lr: float = 0.05
    # Adam's (both kinds) moment decays, FBGEMM's defaults; ε of Adam and of row-wise Adagrad
    # (None: torchrec's default, 1e-8 for Adam, 1e-10 for row-wise Adagrad)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None
    lam: float = field(default=0.0, metadata={"key": "lambda"})  # MBA λ (YAML key `lambda`)
    # n_j: `online` counts the samples seen so far (this batch included); `static` reads the
    # counts that `dinrec count-features` wrote next to the training data.
    counts: Literal["online", "static"] = "online"
    # the row update of MBA (and of the plain optimizers where it runs ours): auto = Triton on CUDA,
    # the C++ kernel on the CPU; fbgemm = the plain optimizers on FBGEMM's own kernels wherever
    # FBGEMM has one (by default the CPU takes ours, measured faster there)
    kernel: Literal["auto", "cpp", "triton", "fbgemm"] = "auto"
    # Plain L2 on every row of every table at every step (the cost MBA avoids; a baseline):
    # SGD: w ← w − lr·(g + l2_all·w) for all rows, touched or not. Row-wise Adagrad: the same
    # decay as decoupled weight decay (as AdamW does it): every row scaled by 1 − lr·l2_all, then
    # the Adagrad step of the touched rows.
    l2_all: float = 0.0

    @property
    def base(self) -> str:
        """The optimizer underneath: sgd, rowwise_adagrad, adam or partial_rowwise_adam."""
        return self.type.removesuffix("_mba")

    @property
    def mba(self) -> bool:
        return self.type.endswith("_mba")


@dataclass(frozen=True)
class DenseOptimizerConfig:
    type: Literal["adam", "sgd"] = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0  # L2 on the dense parameters (coupled, as torch.optim's weight_decay)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    seed: int = 0  # parameter initialisation
    out_dir: str = "runs/default"
    log_every: int = 50  # steps between JSONL metric lines
    limit_batches: int = 0  # stop each epoch after this many batches (0: no limit)
    eval_every_epoch: bool = False  # test metrics after every epoch (metrics.jsonl, result "epochs")
    plan: str | None = None  # a plan file from `dinrec plan` (None: plan on the fly); `train --plan`
    checkpoint_every: int = 1000  # steps between checkpoints (0: none before the end); one at every epoch end
    keep_checkpoints: int = 3  # the newest checkpoints kept under out_dir/checkpoints (0: all)
    resume: str | None = None  # 'latest' or a checkpoint/run directory to continue from; `train --resume`


@dataclass(frozen=True)
class LaunchConfig:
    # ray: `dinrec train` starts a local Ray (127.0.0.1) and runs `workers` Ray Train workers;
    # local: one process, no Ray (debugging). torchrun and `ray job submit` ignore this key.
    launcher: Literal["ray", "local"] = "ray"
    workers: int = 2
    # CPU workers (launcher=ray): the cores, and torch threads, each one gets; 0: a local Ray
    # divides the machine's cores among the workers (at least 1 each), a cluster gives each 1
    cpus_per_worker: int = 0
    use_gpu: bool = False  # one worker per GPU, NCCL
    ray_address: str | None = None  # an existing cluster for launcher=ray (None: start a local one)
    # launcher=ray: restarts of the worker group after a worker dies, each resuming from the
    # latest checkpoint (torchrun: its own --max-restarts)
    max_failures: int = 0


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tables: list[TableConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


def _key(f: dataclasses.Field) -> str:
    """A field's key in YAML (a Python keyword such as `lambda` is stored under another name)."""
    return f.metadata.get("key", f.name)


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_key(f): _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    return obj


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (or start from `base`, or from the defaults), apply `a.b=value` overrides."""
    raw: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}:{where} invalid YAML") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return build(Config, raw, "")


def config_from_dict(raw: dict[str, Any]) -> Config:
    return build(Config, raw, "")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, ".".join(parts[: i + 1]))
        if nxt is None:
            nxt = {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(node, last, key)
        node[idx] = value
    else:
        node[last] = value


def _child(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: cannot set a key inside a {type(node).__name__}")
    return node.get(part)


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{path}: list index {part!r} out of range (0..{len(node) - 1})")
    return int(part)


def build(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from plain data, checking keys and types; `path` names the node."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required key missing")
    obj = cls(**kwargs)
    check = getattr(_CHECKS, cls.__name__, None)
    if check is not None:
        check(obj, path)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = "|".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{path}: {_show(value)} is not one of {choices}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is tp):
        return value
    raise ConfigError(f"{path}: expected {tp.__name__}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


class _CHECKS:
    """Value checks beyond types, run after each section is built."""

    @staticmethod
    def DataConfig(c: DataConfig, path: str) -> None:
        _positive(c.batch_size, f"{path}.batch_size")
        _positive(c.max_hist_len, f"{path}.max_hist_len")
        _positive(c.prefetch, f"{path}.prefetch")
        if c.loader_workers < 0:
            raise ConfigError(f"{path}.loader_workers: must be >= 0, got {c.loader_workers}")

    @staticmethod
    def TableConfig(c: TableConfig, path: str) -> None:
        _positive(c.num_rows, f"{path}.num_rows")
        _positive(c.dim, f"{path}.dim")
        if c.dim % 4:  # FBGEMM's table-batched kernels (CPU and GPU), which every table runs on
            lo, hi = c.dim - c.dim % 4, c.dim + 4 - c.dim % 4
            raise ConfigError(
                f"{path}.dim: {c.dim}: FBGEMM's embedding kernels take dims that are multiples of 4 "
                f"({f'{lo} or ' if lo else ''}{hi})"
            )
        if c.min_partition is not None and c.min_partition % 4:
            raise ConfigError(
                f"{path}.min_partition: {c.min_partition}: column-wise shards are FBGEMM tables too, "
                "their width must be a multiple of 4"
            )
        if not c.features:
            raise ConfigError(f"{path}.features: a table needs at least one feature")
        if c.min_partition is not None:
            _positive(c.min_partition, f"{path}.min_partition")

    @staticmethod
    def ModelConfig(c: ModelConfig, path: str) -> None:
        if not 0 <= c.id_dropout < 1:
            raise ConfigError(f"{path}.id_dropout: must be in [0, 1), got {c.id_dropout}")
        if c.aux_loss < 0:
            raise ConfigError(f"{path}.aux_loss: must be >= 0, got {c.aux_loss}")
        for i, n in enumerate(c.attention_mlp):
            _positive(n, f"{path}.attention_mlp.{i}")
        for i, n in enumerate(c.mlp):
            _positive(n, f"{path}.mlp.{i}")
        for i, n in enumerate(c.cin_layers):
            _positive(n, f"{path}.cin_layers.{i}")
        if c.score_hidden < 0:
            raise ConfigError(f"{path}.score_hidden: must be >= 0, got {c.score_hidden}")
        if c.attention_kernel == "fused" and c.activation != "prelu":
            raise ConfigError(f"{path}.attention_kernel: fused takes PReLU, not activation {c.activation!r}")
        for key in ("cross_layers", "heads", "ffn"):
            _positive(getattr(c, key), f"{path}.{key}")

    @staticmethod
    def SparseOptimizerConfig(c: SparseOptimizerConfig, path: str) -> None:
        _positive(c.lr, f"{path}.lr")
        if c.lam < 0:
            raise ConfigError(f"{path}.lambda: must be >= 0, got {c.lam}")
        if c.lam and not c.mba:
            raise ConfigError(f"{path}.lambda: set, but type {c.type!r} has no MBA (use {c.type}_mba)")
        if c.kernel == "fbgemm" and c.mba:
            raise ConfigError(f"{path}.kernel: fbgemm has no MBA update (type {c.type!r}: auto, cpp or triton)")
        if c.type == "sgd_mba" and c.lr * c.lam >= 1:
            raise ConfigError(
                f"{path}.lambda: lr·lambda = {c.lr * c.lam:g} >= 1: Eq. 7 scales a row seen in one sample by "
                f"1 − lr·lambda/n_j <= 0 (choose lambda < {1 / c.lr:g})"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(c, name) < 1:
                raise ConfigError(f"{path}.{name}: must be in [0, 1), got {getattr(c, name)}")
        if c.eps is not None:
            _positive(c.eps, f"{path}.eps")
        if c.l2_all < 0:
            raise ConfigError(f"{path}.l2_all: must be >= 0, got {c.l2_all}")
        if c.l2_all and c.lr * c.l2_all >= 1:
            raise ConfigError(f"{path}.l2_all: lr·l2_all = {c.lr * c.l2_all:g} >= 1 would zero or flip every row")

    @staticmethod
    def DenseOptimizerConfig(c: DenseOptimizerConfig, path: str) -> None:
        _positive(c.lr, f"{path}.lr")
        if c.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: must be >= 0, got {c.weight_decay}")

    @staticmethod
    def TrainConfig(c: TrainConfig, path: str) -> None:
        _positive(c.epochs, f"{path}.epochs")
        _positive(c.log_every, f"{path}.log_every")
        for key in ("limit_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(c, key) < 0:
                raise ConfigError(f"{path}.{key}: must be >= 0, got {getattr(c, key)}")

    @staticmethod
    def LaunchConfig(c: LaunchConfig, path: str) -> None:
        _positive(c.workers, f"{path}.workers")
        if c.cpus_per_worker < 0:
            raise ConfigError(f"{path}.cpus_per_worker: must be >= 0, got {c.cpus_per_worker}")
        if c.max_failures < 0:
            raise ConfigError(f"{path}.max_failures: must be >= 0, got {c.max_failures}")

    @staticmethod
    def Config(c: Config, path: str) -> None:
        if not c.tables:
            raise ConfigError("tables: at least one table is required")
        seen: dict[str, str] = {}
        names: set[str] = set()
        for i, t in enumerate(c.tables):
            if t.name in names:
                raise ConfigError(f"tables.{i}.name: duplicate table name {t.name!r}")
            names.add(t.name)
            for f in t.features:
                if f in seen:
                    raise ConfigError(f"tables.{i}.features: feature {f!r} already read by table {seen[f]!r}")
                seen[f] = t.name
        for i, t in enumerate(c.tables):
            for f in t.features:
                if is_negative(f):
                    raise ConfigError(
                        f"tables.{i}.features: {f!r}: DIEN's negatives are added to the table of "
                        f"their behaviours by themselves (model.aux_loss > 0); do not list them"
                    )
                candidate = candidate_of(f)
                if candidate is not None and candidate not in t.features:
                    raise ConfigError(
                        f"tables.{i}.features: {f!r} needs its candidate feature {candidate!r} "
                        "in the same table (candidate and behaviours share one table)"
                    )
        for required in ("item_id", behaviour_of("item_id")):
            if required not in seen:
                raise ConfigError(f"tables: no table reads the required feature {required!r}")
        for i, t in enumerate(c.tables):
            if (c.sparse_optimizer.mba or "adam" in c.sparse_optimizer.type) and t.compute_kernel != "fused":
                raise ConfigError(
                    f"tables.{i}.compute_kernel: {t.compute_kernel} with {c.sparse_optimizer.type}: "
                    "this optimizer runs on the fused kernel only"
                )
        _check_groups(c)
        seq_dims = {t.dim for t in c.tables if any(candidate_of(f) for f in t.features)}
        if len(seq_dims) > 1:
            raise ConfigError(
                f"tables: behaviour tables must share one dim (EmbeddingCollection), got {sorted(seq_dims)}"
            )


# models whose interaction layer takes inner products between fields: one embedding width for all
FIELD_MODELS = ("pnn", "deepfm", "xdeepfm")


def _check_groups(c: Config) -> None:
    """data.profile / data.context name sparse features of a table (not a candidate or behaviour)
    or dense features, each in one group at most; the FM-like models need one field width."""
    table_of = {f: t for t in c.tables for f in t.features}
    grouped: dict[str, str] = {}
    for group in ("profile", "context"):
        for i, f in enumerate(getattr(c.data, group)):
            path = f"data.{group}.{i}"
            if f in grouped:
                raise ConfigError(f"{path}: {f!r} is already in data.{grouped[f]}")
            grouped[f] = group
            t = table_of.get(f)
            if t is not None and (candidate_of(f) is not None or behaviour_of(f) in t.features):
                raise ConfigError(f"{path}: {f!r} is a candidate or behaviour feature, not a {group} feature")
            if t is None and f not in c.data.dense_features:
                raise ConfigError(
                    f"{path}: {f!r} is neither read by a table (tables.*.features) nor in data.dense_features"
                )
    if c.model.name == "mian":
        for group in ("profile", "context"):
            dims = {table_of[f].dim for f in getattr(c.data, group) if f in table_of}
            if len(dims) > 1:
                raise ConfigError(
                    f"data.{group}: MIAN sums a group's fields (Eq. 11, 13), so its features need one "
                    f"table dim, got {sorted(dims)}"
                )
        width = FeatureLayout.from_config(c).behaviour_dim
        if width % c.model.heads:
            raise ConfigError(f"model.heads: {c.model.heads} does not divide the behaviour width {width}")
    if c.model.name in FIELD_MODELS:
        dims = {t.dim for t in c.tables}
        if len(dims) > 1:
            raise ConfigError(
                f"tables: model {c.model.name} takes inner products between fields, so every table needs "
                f"one dim, got {sorted(dims)}"
            )


def _positive(value: float, path: str) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be > 0, got {value}")
