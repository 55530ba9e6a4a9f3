"""The loss and the training step on this rank's part of the global batch: `Steps`, torchrec's
TrainPipelineSparseDist around the model (what training, the benchmarks and the tests run), and
`train_step`, the same step one batch after the other without a pipeline (the baseline that
`dinrec bench train` times it against).

The pipeline keeps three batches in flight: while batch i runs forward, backward and the
optimizers, batch i+1's sparse features go through the embedding modules' input distribution
(the id all-to-all) and batch i+2 is copied to the device (CUDA: on their own streams). The
embedding lookups of batch i+1 run in its own forward, after batch i's fused update, so every
step sees the same weights as in the plain loop: the pipeline changes when the inputs move,
not what is computed. It pulls batches from its iterator two ahead of the step that runs.

Each rank's loss is the mean over its local rows; DDP averages dense gradients over ranks and
torchrec's collectives divide embedding gradients by the world size, so with equal local batch
sizes every update uses the global-batch mean gradient. Where the ranks' batches differ in size
(a segment's last batch, see trainer.data.Segment) each rank's loss is scaled by
`batch.loss_scale` = n·W / N, which makes the average the mean over the global batch's N rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

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


class Steps:
    """Training steps through torchrec's TrainPipelineSparseDist, with our loss.

    `run(batches)` trains on each batch in order and yields each step's loss, a detached tensor
    on the device: nothing in a step waits for the device (the caller reads losses when it logs).
    `check` and `before_backward` are those of `train_step`; `check` may record the loss but
    must not read it (a read is a host sync). Before anything else calls the model (evaluation,
    `attention_weights`), `detach()` gives it back its own forward; the next `run` re-attaches.
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        before_backward: Callable[[], None] | None = None,
        check: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.model, self.before_backward, self.check = model, before_backward, check
        self.pipeline = TrainPipelineSparseDist(
            model, opt, device, execute_all_batches=True, custom_model_fwd=self._forward
        )

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = training_loss(self.model, batch)
        if self.check is not None:
            loss = self.check(loss)
        if self.before_backward is not None:
            self.before_backward()
        return loss, loss.detach()

    def run(self, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
        it = iter(batches)
        while True:
            try:
                loss = self.pipeline.progress(it)
            except StopIteration:
                return
            yield loss

    def detach(self) -> None:
        self.pipeline.detach()
