"""One training or evaluation batch: the sparse features as torchrec KeyedJaggedTensors (the
candidate and behaviour features, FeatureLayout.seq_features order; the pooled features,
FeatureLayout.pooled_features order; with `history_pooled`, BaseModel's, the candidate and
behaviour features are pooled ones and `sparse` is empty), the dense features, the labels and
the GAUC key.

A Batch is what torchrec's TrainPipelineSparseDist moves and distributes ahead of the step
(trainer.step): the model reads both KJTs as plain attributes of its input, so the pipeline can
start their input distribution for the next batch while this one computes.

Also id dropout (DIN paper §6.5), the one transformation of a batch's ids in training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from embedding.layout import jagged_rows

_MOVABLE = (torch.Tensor, KeyedJaggedTensor)


@dataclass
class Batch(Pipelineable):
    sparse: KeyedJaggedTensor  # candidate and behaviour features, FeatureLayout.seq_features order
    dense: torch.Tensor  # [B, F] float32
    labels: torch.Tensor  # [B] float32 in {0, 1}
    users: torch.Tensor  # [B] int64, the GAUC grouping key
    p_click: torch.Tensor | None = None  # [B] float32, generator's true probability if present
    # what this rank's mean loss is multiplied by when the ranks' batches differ in size (see
    # trainer.data.Segment.loss_scale); None: all ranks have as many rows
    loss_scale: float | None = None
    pooled: KeyedJaggedTensor | None = None  # FeatureLayout.pooled_features order; None: no pooled tables

    def _map(self, f) -> Batch:
        """A Batch with f applied to each tensor and KJT (the other fields as they are)."""
        return Batch(**{k.name: f(v) if isinstance(v := getattr(self, k.name), _MOVABLE) else v for k in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        if torch.device(device) == self.labels.device:
            return self  # nothing moves (the CPU path): the same batch, its KJTs' caches kept
        return self._map(lambda v: v.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda v: v.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        """The pipeline's copy stream made these tensors; the step's stream uses them (CUDA)."""
        for k in fields(self):
            if isinstance(v := getattr(self, k.name), _MOVABLE):
                v.record_stream(stream)

    def __len__(self) -> int:
        return self.labels.numel()

    def feature(self, name: str):
        """The JaggedTensor of one feature, from whichever KJT holds it."""
        for kjt in (self.sparse, self.pooled):
            if kjt is not None and name in kjt.keys():
                return kjt[name]
        raise KeyError(name)


def features_kjt(keys: list[str], lengths: list[torch.Tensor], values: list[torch.Tensor]) -> KeyedJaggedTensor:
    """A KJT of `keys` from per-key lengths (int32) and ids (int64); no keys: an empty KJT (a
    batch whose features are all of the other kind)."""
    if not keys:
        return KeyedJaggedTensor(
            keys=[], values=torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int32)
        )
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


def drop_ids(kjt: KeyedJaggedTensor, keys: set[str], p: float, generator: torch.Generator) -> KeyedJaggedTensor:
    """Dropout on feature ids (DIN paper §6.5): each behaviour of a sample is discarded with
    probability p, from every feature in `keys` at once (hist_item_id and hist_cate_id describe the
    same behaviours and must stay aligned); other features, and every sample, stay."""
    jts = kjt.to_dict()
    targeted = [k for k in kjt.keys() if k in keys]
    if not targeted:
        return kjt
    lengths = jts[targeted[0]].lengths()
    for k in targeted[1:]:
        if not torch.equal(jts[k].lengths(), lengths):
            raise ValueError(f"id dropout: {k} and {targeted[0]} have different lengths per sample")
    keep = torch.rand(int(lengths.sum()), generator=generator) >= p
    sample = jagged_rows(lengths.long(), keep.numel())
    new_lengths = torch.zeros_like(lengths).index_add_(
        0, sample[keep], torch.ones_like(sample[keep], dtype=lengths.dtype)
    )
    values, out_lengths = [], []
    for k in kjt.keys():
        jt = jts[k]
        values.append(jt.values()[keep] if k in keys else jt.values())
        out_lengths.append(new_lengths if k in keys else jt.lengths())
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(out_lengths))
