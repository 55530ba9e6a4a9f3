"""What the dense side of a rank holds in device memory, for the planner's storage reservation and
its per-rank report: measured on the CPU, not guessed.

- parameters: the dense tower's parameters, their gradients, DDP's gradient buckets and the dense
  optimizer's state (Adam: two moments), in bytes;
- activations: what one training forward keeps for its backward (autograd's saved tensors,
  parameters excepted, each storage once) at the planned per-rank batch size with every history
  at `data.max_hist_len` (the worst case: models pad to the longest history of the batch).

Measured by running the config's model once on the CPU with the same dims and small tables
(their rows are the planner's business), so every model and layer counts without a formula per
layer. Not counted: the embedding kernels' own temporaries and the CUDA allocator's slack.
"""

from __future__ import annotations

import dataclasses

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.layout import FeatureLayout, is_sequence
from trainer.batch import Batch, features_kjt
from trainer.config import Config
from trainer.models import MODELS
from trainer.step import training_loss

OPTIMIZER_STATES = {"adam": 2, "sgd": 0}  # per-parameter state tensors (SGD without momentum)
SMALL_ROWS = 64  # table rows for the measurement; lookups cost the same at any size


def dense_memory(cfg: Config, batch_size: int) -> dict[str, int]:
    """{"parameters": bytes, "activations": bytes} of one rank's dense side (see the module
    docstring); the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _measure(cfg, batch_size)


def _measure(cfg: Config, batch_size: int) -> dict[str, int]:
    small = dataclasses.replace(
        cfg,
        tables=[dataclasses.replace(t, num_rows=min(t.num_rows, SMALL_ROWS), id_map="identity") for t in cfg.tables],
    )
    layout = FeatureLayout.from_config(small)
    torch.manual_seed(0)
    model = MODELS[cfg.model.name](layout, cfg.model, len(cfg.data.dense_features), device=torch.device("cpu"))
    model.train()
    sparse = {id(p) for p in model.sparse.parameters()}
    dense_params = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in sparse)
    parameters = dense_params * (3 + OPTIMIZER_STATES[cfg.dense_optimizer.type])

    rows = {f: t.num_rows for t in layout.tables for f in t.features}
    gen = torch.Generator().manual_seed(0)

    def kjt(keys: list[str]) -> KeyedJaggedTensor:
        lengths, values = [], []
        for key in keys:
            n = cfg.data.max_hist_len if is_sequence(key) else 1
            lengths.append(torch.full((batch_size,), n, dtype=torch.int32))
            values.append(torch.randint(0, rows[key], (batch_size * n,), generator=gen))
        return features_kjt(keys, lengths, values)

    batch = Batch(
        sparse=kjt(layout.seq_features),
        pooled=kjt(layout.pooled_features) if layout.pooled_features else None,
        dense=torch.zeros(batch_size, len(cfg.data.dense_features)),
        labels=(torch.rand(batch_size, generator=gen) < 0.5).float(),
        users=torch.arange(batch_size),
    )
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(model, batch)
    del loss
    return {"parameters": parameters, "activations": sum(saved.values())}
