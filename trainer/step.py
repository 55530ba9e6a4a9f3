"""The loss and one training step on this rank's part of the global batch.

Each rank's loss is the mean over its local rows; DDP averages dense gradients over ranks and
torchrec's collectives divide embedding gradients by the world size, so with equal local batch
sizes every update uses the global-batch mean gradient. Where the ranks' batches differ in size
(a segment's last batch, see trainer.data.Segment) each rank's loss is scaled by
`batch.loss_scale` = n·W / N, which makes the average the mean over the global batch's N rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.batch import Batch


def training_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The loss to minimise on a batch: the click log loss, plus the model's own training term
    when its forward returns (logits, term) (DIEN: L = L_target + α·L_aux, Eq. 7)."""
    out = model(batch)
    logits, extra = out if isinstance(out, tuple) else (out, None)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
    loss = loss if extra is None else loss + extra
    return loss if batch.loss_scale is None else loss * batch.loss_scale


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batch: Batch,
    before_backward: Callable[[], None] | None = None,
    check: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One step; returns the local mean loss. `check` sees the loss before the backward pass and
    returns the loss to use (or raises); `before_backward` runs between the forward pass and the
    fused sparse update (the plain-L2 baseline's decay)."""
    loss = training_loss(model, batch)
    if check is not None:
        loss = check(loss)
    if before_backward is not None:
        before_backward()
    opt.zero_grad(set_to_none=True)
    loss.backward()  # the fused sparse optimizer updates the tables here
    opt.step()
    return loss.item()
