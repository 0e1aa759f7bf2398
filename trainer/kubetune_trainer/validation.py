"""Validation while training (``training.validation``): the loss on the validation split,
and the early-stopping decision.

The train stage uses it like this::

    rows = load_validation_rows(ctx, eos, vocab_size, bos_id=bos)    # once, before the loop
    stopper = EarlyStopping.from_spec(spec.training.validation)
    ...
    nll, targets = validation_nll(model, rows, rank=r, world=n, ...)   # this process's shard
    (summed over the processes)
    decision = stopper.update(step, nll / targets)                     # new best? stop?
    state.validation = stopper.to_state()                              # into the checkpoint

**The loss** is the train stage's own, on other rows: the validation split (carved out of
train by prepare, :mod:`kubetune_trainer.validation_split`), or its first
``maxSamples`` lines or examples, becomes rows exactly as training rows are built
(:func:`kubetune_trainer.packing.build_rows`: bos + line + eos, packed into
``maxSeqLength`` blocks with no attention across lines when ``training.packing``; for
instruction datasets only the answer tokens and each example's eos are targets, from
the split's loss mask). It is token-weighted: the summed NLL over every target of every
row divided by the number of targets, in eval mode (no dropout) and without gradients.
With several processes each scores the rows ``rank, rank + world, ...`` and the sums
and counts are added up, so the number is the one a single process gets.

**Early stopping** (:class:`EarlyStopping`) counts validations in a row that did not
lower the best loss so far by at least ``minDelta``; after ``earlyStoppingPatience`` of
them training stops. The best loss itself is the lowest seen (any drop counts there):
that is the step whose weights ``keepBest`` keeps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kubetune.contract import StageError
from kubetune.dataset_format import VALIDATION, read_loss_mask, read_tokens
from kubetune.layout import RunLayout
from kubetune.schema import Reason, ValidationSpec
from kubetune_trainer.context import StageContext
from kubetune_trainer.packing import Rows, build_rows, collate, model_inputs, token_nll_sum

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- early stopping


@dataclass(frozen=True)
class Decision:
    """What one validation means for training."""

    improved: bool  # a new lowest validation loss (the weights keepBest keeps)
    stop: bool  # patience used up: stop training now


@dataclass
class EarlyStopping:
    """The early-stopping state: best loss and step, validations without enough improvement.

    Pure (no torch): ``update`` takes each validation loss in order; ``to_state`` /
    ``from_state`` carry it through a checkpoint, so a resumed run continues the same count.
    """

    patience: int | None = None  # None: never stop early
    min_delta: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    bad: int = 0  # validations in a row without an improvement of at least min_delta
    last_loss: float | None = None
    last_step: int | None = None
    stopped: bool = False

    @classmethod
    def from_spec(cls, spec: ValidationSpec) -> EarlyStopping:
        return cls(patience=spec.early_stopping_patience, min_delta=spec.min_delta)

    def update(self, step: int, loss: float) -> Decision:
        """Take the validation loss at ``step``; a non-finite loss never improves."""
        finite = math.isfinite(loss)
        best = self.best_loss
        improved = finite and (best is None or loss < best)
        significant = finite and (best is None or loss < best - self.min_delta)
        self.bad = 0 if significant else self.bad + 1
        if improved:
            self.best_loss, self.best_step = loss, step
        self.last_loss, self.last_step = loss, step
        stop = self.patience is not None and self.bad >= self.patience
        self.stopped = self.stopped or stop
        return Decision(improved=improved, stop=stop)

    def to_state(self) -> dict[str, Any]:
        data = asdict(self)
        if data["last_loss"] is not None and not math.isfinite(data["last_loss"]):
            data["last_loss"] = None  # JSON has no NaN
        return data

    @classmethod
    def from_state(cls, spec: ValidationSpec, state: dict[str, Any] | None) -> EarlyStopping:
        """The state saved with a checkpoint; patience and minDelta are the spec's."""
        stopper = cls.from_spec(spec)
        if state:
            stopper.best_loss = state.get("best_loss")
            stopper.best_step = state.get("best_step")
            stopper.bad = int(state.get("bad") or 0)
            stopper.last_loss = state.get("last_loss")
            stopper.last_step = state.get("last_step")
            stopper.stopped = bool(state.get("stopped"))
        return stopper


# --------------------------------------------------------------------------- the rows


def load_validation_rows(
    ctx: StageContext, eos_id: int, vocab_size: int, bos_id: int | None = None
) -> Rows:
    """The validation split (its first ``maxSamples`` lines or examples) as training rows."""
    t = ctx.job.spec.training
    spec = t.validation
    assert spec is not None
    if not ctx.storage.exists(RunLayout.VALIDATION_TOKENS):
        raise StageError(
            f"{ctx.storage.uri(RunLayout.VALIDATION_TOKENS)}: no validation split; "
            "training.validation needs one carved by the prepare stage: run prepare again",
            reason=Reason.DATASET_UNUSABLE,
        )
    local_dir = ctx.scratch_dir("dataset")
    split = read_tokens(ctx.storage, VALIDATION, vocab_size=vocab_size, local_dir=local_dir)
    mask = None
    if ctx.job.spec.dataset.is_instruction:
        mask = read_loss_mask(ctx.storage, split, local_dir=local_dir)
    n = split.lines if spec.max_samples is None else min(spec.max_samples, split.lines)
    offsets = np.asarray(split.offsets[: n + 1], dtype=np.int64)
    end = int(offsets[-1])
    if end == 0:
        raise StageError(
            f"{ctx.storage.uri(RunLayout.VALIDATION_TOKENS)}: the validation split has no "
            "tokens; raise training.validation.fraction or add data",
            reason=Reason.DATASET_UNUSABLE,
        )
    return build_rows(
        np.asarray(split.tokens[:end]),
        offsets,
        block_size=t.max_seq_length,
        eos_id=eos_id,
        bos_id=bos_id if bos_id is not None else eos_id,
        packing=t.packing,
        loss_mask=None if mask is None else np.asarray(mask[:end]),
    )


# --------------------------------------------------------------------------- the loss


def validation_nll(
    model: Any,
    rows: Rows,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    attn_implementation: str = "eager",
    mask_dtype: torch.dtype | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[float, int]:
    """(summed NLL, targets) of this process's share of ``rows`` (rows ``rank::world``).

    The caller puts the model in eval mode, disables gradients and autocasts as
    training does; the sum is accumulated in float64 on the host, one sync per batch.
    """
    import torch

    mine = np.arange(rank, len(rows), world)
    nll = 0.0
    targets = int(rows.row_targets()[mine].sum())
    for start in range(0, len(mine), batch_size):
        arrays = collate(rows, mine[start : start + batch_size], pad_id)
        batch = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
        inputs = model_inputs(
            batch,
            packed=rows.packed,
            attn_implementation=attn_implementation,
            mask_dtype=mask_dtype if mask_dtype is not None else torch.float32,
        )
        nll += float(token_nll_sum(model(**inputs).logits, batch["labels"]).item())
    return nll, targets
