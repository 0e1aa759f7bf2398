"""The train stage: an Accelerate loop over packed blocks, with resumable checkpoints.

Run it::

    kubetune train --job job.yaml [--output file:///runs/x]        # one process
    accelerate launch -m kubetune.cli train --job job.yaml  # several GPUs / nodes

or call ``run(ctx)`` in process (``kubetune run job.yaml`` does). It reads
``dataset/`` (prepare's token arrays, tokenizer and result), writes checkpoints under
``training/<fingerprint>/`` (one directory per dataset and settings: a rerun after a
change starts afresh there and says why; :mod:`kubetune.fingerprint`),
``train/progress.json`` + ``train/metrics.jsonl`` while it runs, then the
standalone model under ``model/`` with ``kubetune-training.json`` (what it was trained
on, checked by evaluate) and finally ``train/train.json``.

The loop is the Accelerate examples' (``prepare``, ``accumulate``,
``clip_grad_norm_``, ``save_state``/``load_state``) with these choices:

* data: prepare's lines, each + eos, packed greedily into ``maxSeqLength`` blocks
  with no attention across lines (:mod:`kubetune_trainer.packing`); for
  instruction datasets (``dataset.kind`` promptCompletion or chat) each line is an
  example and only its answer tokens and eos are trained (prepare's loss mask); one seeded
  shuffle per epoch. Optimizer step ``s`` consumes global micro-batches
  ``s*GA .. s*GA+GA-1`` of the endless sequence of epochs, so the position in the
  data is a pure function of the step and a resume continues the same order;
* sharding: global micro-batch = ``batchSize * num_processes`` blocks; process
  ``r`` takes slice ``r``; the last partial batch of an epoch wraps around when
  there are several processes (as ``DistributedSampler`` pads) so all ranks step
  together;
* loss: summed token NLL of the micro-batch divided by the predicted tokens
  (instruction datasets: answer tokens and their eos) of the whole optimizer step,
  over every process and micro-batch (token-weighted, not a mean of micro-batch
  or per-process means); the BatchSource knows every
  process's rows, so each counts the step's targets without a collective, and
  scales by the processes because DDP averages gradients (:func:`loss_scale`);
* no host sync per step: the loss stays on the device until a log step;
* the LR scheduler is stepped by us once per optimizer step (Accelerate's prepared
  scheduler would step once per process) and registered for checkpointing.

With ``training.validation`` the validation split is scored every ``everySteps``
optimizer steps and at the end (:mod:`kubetune_trainer.validation`: the token-weighted
loss over its rows, eval mode, summed over every process's shard). Each score goes to
the metrics row of its step (``validation_loss``), progress.json, the Prometheus gauges
and the log. A new lowest loss with ``keepBest`` saves a checkpoint at that step (so the
best weights are always in storage, also after a resume), kept by pruning next to the
newest ``keepCheckpoints``; ``earlyStoppingPatience`` validations without an improvement
of ``minDelta`` stop training there (a checkpoint, then the model, as at the planned
end). With ``keepBest`` the model saved under ``model/`` has the best step's weights
(``modelStep`` in train.json and ``kubetune-training.json``). The early-stopping state is
in every checkpoint's trainer state, so a resumed run continues the same count. The
complete checkpoints (step, losses, URI, best) are listed in progress.json and
train.json (``checkpoints``) for the status.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kubetune.contract import Interrupted, StageError
from kubetune.dataset_format import TRAIN, read_loss_mask, read_tokens
from kubetune.fingerprint import changed, fingerprint, training_inputs
from kubetune.layout import RunLayout
from kubetune.results import PrepareResult, TrainingRecord, TrainResult
from kubetune.schema import LoraSpec, Progress, Reason, TrainingSpec
from kubetune.storage import StorageError
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.bleu import context_token_id
from kubetune_trainer.context import StageContext
from kubetune_trainer.exporter import ProgressWriter, TrainMetrics, rfc3339_now
from kubetune_trainer.interruption import (
    StopRequest,
    is_distributed_launch,
    process_group_kwargs,
    rendezvous_error,
)
from kubetune_trainer.packing import Rows, build_rows, collate
from kubetune_trainer.validation import EarlyStopping, load_validation_rows, validation_nll

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """How many steps, from the number of rows and the batch geometry (computed up front)."""

    rows: int  # training rows (packed blocks)
    batch_size: int  # rows per process per micro-batch
    num_processes: int
    grad_accum: int
    micro_per_epoch: int  # global micro-batches per epoch
    total_steps: int  # optimizer steps
    warmup_steps: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes


def make_plan(rows: int, t: TrainingSpec, num_processes: int) -> Plan:
    global_batch = t.batch_size * num_processes
    micro_per_epoch = max(1, math.ceil(rows / global_batch))
    if t.max_steps is not None:
        total = t.max_steps
    else:
        total = max(1, math.ceil(t.epochs * micro_per_epoch / t.gradient_accumulation_steps))
    warmup = math.ceil(t.warmup_ratio * total)
    return Plan(
        rows,
        t.batch_size,
        num_processes,
        t.gradient_accumulation_steps,
        micro_per_epoch,
        total,
        warmup,
    )


@dataclass(frozen=True)
class MicroBatch:
    """This process's share of a global micro-batch, with counts over all processes."""

    arrays: dict[str, np.ndarray]  # this process's rows, collated (packing.collate)
    tokens: int  # real tokens of the global micro-batch (every process's rows)
    # predicted tokens of the global micro-batch (every process's rows): with a loss mask
    # (instruction datasets) the answer tokens and their eos only
    targets: int


class BatchSource:
    """Micro-batches by global index: a seeded permutation per epoch, sharded by rank."""

    def __init__(self, rows: Rows, plan: Plan, rank: int, seed: int, pad_id: int) -> None:
        self.rows = rows
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.pad_id = pad_id
        self.row_lengths = rows.row_lengths()
        self.row_targets = rows.row_targets()
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(len(self.rows))
            self._epoch = epoch
        return self._perm

    def position(self, micro: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) of global micro-batch ``micro``."""
        return divmod(micro, self.plan.micro_per_epoch)

    def global_indices(self, micro: int) -> np.ndarray:
        epoch, b = self.position(micro)
        perm = self.order(epoch)
        g = self.plan.global_batch
        if self.plan.num_processes == 1:
            return perm[b * g : (b + 1) * g]
        return perm[np.arange(b * g, (b + 1) * g) % len(perm)]

    def batch(self, micro: int) -> MicroBatch:
        """This process's rows of global micro-batch ``micro``; counts cover every process's."""
        idx = self.global_indices(micro)
        tokens = int(self.row_lengths[idx].sum())
        targets = int(self.row_targets[idx].sum())
        if self.plan.num_processes > 1:
            b = self.plan.batch_size
            idx = idx[self.rank * b : (self.rank + 1) * b]
        return MicroBatch(collate(self.rows, idx, self.pad_id), tokens, targets)


# --------------------------------------------------------------------------- setup


def resolve_precision(requested: str, cuda: bool) -> str:
    """Accelerate's mixed_precision for the spec's precision on this machine."""
    if requested == "fp32":
        return "no"
    if requested == "fp16" and not cuda:
        log.warning(
            "training.precision fp16 needs a GPU; this machine has none, so training "
            "runs in fp32 (use bf16 or fp32 on CPUs)"
        )
        return "no"
    if requested == "bf16" and cuda:
        import torch

        if not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16 support; training.precision bf16 falls back to fp16")
            return "fp16"
    return requested


def load_training_rows(
    ctx: StageContext, eos_id: int, vocab_size: int, bos_id: int | None = None
) -> Rows:
    """Prepare's train token arrays (:mod:`kubetune.dataset_format`) -> training rows.

    Instruction datasets (``dataset.kind`` promptCompletion or chat) come with a loss
    mask: the rows then train on the answer tokens (and each example's eos) only.
    """
    t = ctx.job.spec.training
    # Downloaded once per node into scratch and memory-mapped; checked against the format.
    local_dir = ctx.scratch_dir("dataset")
    split = read_tokens(ctx.storage, TRAIN, vocab_size=vocab_size, local_dir=local_dir)
    tokens, offsets = split.tokens, split.offsets
    if len(tokens) == 0:
        raise StageError(
            f"{ctx.storage.uri(RunLayout.TRAIN_TOKENS)}: the training split has no "
            "tokens; check dataset.source and dataset.clean",
            reason=Reason.DATASET_UNUSABLE,
        )
    loss_mask = None
    if ctx.job.spec.dataset.is_instruction:
        loss_mask = read_loss_mask(ctx.storage, split, local_dir=local_dir)
    # Lines start with the token evaluation scores from (bos, else eos): see packing.py.
    return build_rows(
        tokens,
        offsets,
        block_size=t.max_seq_length,
        eos_id=eos_id,
        bos_id=bos_id if bos_id is not None else eos_id,
        packing=t.packing,
        loss_mask=loss_mask,
    )


def apply_lora(model: Any, ctx: StageContext) -> Any:
    """Wrap ``model`` with peft LoRA adapters (spec.training.lora)."""
    lora = ctx.job.spec.training.lora
    assert lora is not None
    return apply_lora_spec(model, lora)


def apply_lora_spec(model: Any, lora: LoraSpec) -> Any:
    """Wrap ``model`` with the peft LoRA adapters ``lora`` describes."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        model.config.model_type
    )
    if not targets:
        raise StageError(
            f"training.lora.targetModules: peft has no default for model type "
            f"{model.config.model_type!r}; list the module names to adapt (e.g. q_proj, v_proj)",
            reason=Reason.INVALID_SPEC,
        )
    matched = [
        m
        for name, m in model.named_modules()
        if any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not matched:
        raise StageError(
            f"training.lora.targetModules {targets}: no module of the model has that name",
            reason=Reason.INVALID_SPEC,
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        # GPT-2 stores its projections transposed (Conv1D); peft must know.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated ``is_gradient_checkpointing``; not ours to fix.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config)


def _optimizer(model: Any, t: TrainingSpec) -> torch.optim.Optimizer:
    import torch

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and norm weights are not decayed (the usual AdamW recipe).
        (no_decay if p.ndim < 2 or "ln" in name or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": t.learning_rate}
    # Fused (one kernel over all tensors) on GPU and CPU (torch >= 2.4 has a CPU kernel):
    # on CPU the foreach path runs ~8 ops per tensor, 7% of a small model's step against
    # 1.3% fused (bench/RESULTS.md, issue 16); other devices keep foreach.
    if all(p.device.type in ("cuda", "cpu") for p in decay + no_decay):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _reset_single_process_accelerate() -> None:
    """Forget Accelerate's process-wide state from an earlier run in this process.

    ``AcceleratorState`` is a singleton that refuses a second ``Accelerator`` with
    another mixed precision; local mode, tests and benchmarks run several stages
    or jobs in one process. Never done under a distributed launch, where the
    state holds the process group.
    """
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def _device_name(accelerator: Accelerator) -> str:
    import torch

    device = accelerator.device
    name = str(device.type)
    if device.type == "cuda":
        name = f"cuda ({torch.cuda.get_device_name(device)})"
    if accelerator.num_processes > 1:
        name = f"{name} x{accelerator.num_processes}"
    return name


@dataclass(frozen=True)
class TrainingIdentity:
    """What this training trains on (:mod:`kubetune.fingerprint`) and where its checkpoints go."""

    prepared: PrepareResult
    inputs: dict[str, Any]
    fingerprint: str
    run_key: str  # RunLayout.training_run(fingerprint)

    @property
    def dataset_fingerprint(self) -> str:
        return self.prepared.fingerprint or self.prepared.train_sha256


def training_identity(ctx: StageContext, num_processes: int) -> TrainingIdentity:
    """The training fingerprint from prepare's result, the spec and the process count."""
    try:
        prepared = PrepareResult.model_validate_json(
            ctx.storage.read_text(RunLayout.PREPARE_RESULT)
        )
    except StorageError as exc:
        raise StageError(f"{exc}; run the prepare stage first", Reason.DATASET_UNUSABLE) from None
    dataset = prepared.fingerprint or prepared.train_sha256
    inputs = training_inputs(ctx.job.spec, dataset, num_processes)
    inputs["trainSha256"] = prepared.train_sha256
    fp = fingerprint(inputs)
    return TrainingIdentity(prepared, inputs, fp, RunLayout.training_run(fp))


def _check_resume(state: ckpt.TrainerState, identity: TrainingIdentity, key: str) -> None:
    """A checkpoint in this training run's directory must carry its fingerprint."""
    if state.config.get("trainingFingerprint") != identity.fingerprint:
        what = changed(state.config.get("trainingInputs") or {}, identity.inputs)
        raise StageError(
            f"checkpoint {key} was made for other training ({'; '.join(what) or 'unknown'}); "
            "delete it to start over",
            reason=Reason.INVALID_SPEC,
        )


# --------------------------------------------------------------------------- the loop


def loss_scale(plan: Plan, step_targets: int) -> float:
    """The factor on a micro-batch's summed NLL that makes the step's gradient sum NLL / targets.

    ``step_targets`` are the predicted tokens of the whole optimizer step: every
    process's rows of every micro-batch. ``accelerator.backward`` divides the loss
    by the accumulation steps and DDP averages gradients over the processes, so
    both are multiplied back: the gradient is what one process would get on the
    same global batch.
    """
    return plan.grad_accum * plan.num_processes / max(1, step_targets)


@dataclass
class _Setup:
    """What the loop trains with, built once by ``_Trainer._build`` before it."""

    model: Any  # prepared by Accelerate (in DDP under a distributed launch)
    tokenizer: Any
    optimizer: Any  # prepared AdamW
    scheduler: Any  # stepped by us, once per optimizer step
    source: BatchSource
    plan: Plan
    config: dict[str, Any]  # resolved hyperparameters, saved with every checkpoint
    attn: str  # the model's attention implementation (decides the packed mask)
    mask_dtype: torch.dtype  # dtype of the packed attention mask (the autocast dtype)
    validation: Rows | None = None  # training.validation: the rows scored every everySteps


@dataclass
class _Window:
    """Sums since the last log line; the NLL stays on the device until then (no host sync)."""

    nll: torch.Tensor  # this process's summed token NLL
    first_bad_step: torch.Tensor  # first step with a non-finite NLL here; -1 while none
    targets: int = 0  # predicted tokens, all processes
    tokens: int = 0  # real tokens, all processes
    started: float = 0.0  # time.perf_counter() at the previous log line


class _Trainer:
    """One attempt of the train stage: ``run`` builds, resumes, loops and finishes.

    The attributes set here are everything the loop's helpers share; what is
    built from the model and the data is the :class:`_Setup` that ``_build`` returns.
    """

    def __init__(self, ctx: StageContext) -> None:
        import torch
        from accelerate import Accelerator

        self.ctx = ctx
        self.t = ctx.job.spec.training
        self.started = time.time()  # wall clock at the attempt's start (result.seconds)
        self.mixed_precision = resolve_precision(str(self.t.precision), torch.cuda.is_available())
        _reset_single_process_accelerate()
        try:
            self.accelerator = Accelerator(
                mixed_precision=self.mixed_precision,
                gradient_accumulation_steps=self.t.gradient_accumulation_steps,
                kwargs_handlers=process_group_kwargs(),
            )
        except (RuntimeError, OSError) as exc:
            if not is_distributed_launch():
                raise
            raise rendezvous_error(exc) from exc
        # What this training is (dataset + settings) decides where its checkpoints live.
        self.identity = training_identity(ctx, self.accelerator.num_processes)
        self.checkpoints = ctx.storage.sub(self.identity.run_key)
        self.metrics = TrainMetrics(
            ctx.job.metadata.name, ctx.job.metadata.namespace, self.accelerator.process_index
        )
        self.progress = ProgressWriter(ctx.storage)  # written by the main process only
        self.bar: Any = None  # tqdm bar while the loop runs (main process, ctx.show_progress)
        device = self.accelerator.device
        self.window = _Window(
            nll=torch.zeros((), device=device, dtype=torch.float32),
            first_bad_step=torch.full((), -1, device=device, dtype=torch.long),
        )
        self.resumed_from: int | None = None  # step of the checkpoint this attempt started from
        self.last_checkpoint: int | None = None  # step of the newest checkpoint written/loaded
        self.first_step = 0  # the step this attempt's loop started at
        self.elapsed_before = 0.0  # training seconds of earlier attempts (from the checkpoint)
        self.loop_start = 0.0  # time.perf_counter() at the loop's start
        self.loop_seconds = 0.0  # this attempt's loop, checkpoints included
        self.loop_tokens = 0  # real tokens this attempt trained on, all processes
        self.final_loss: float | None = None  # the loss of the last log line
        # training.validation: best loss/step and patience (restored from the checkpoint)
        v = self.t.validation
        self.stopper: EarlyStopping | None = EarlyStopping.from_spec(v) if v else None
        self.validated_at: int | None = None  # the step of the latest validation this attempt
        self.stop = StopRequest()  # SIGTERM: stop at the next step boundary (installed by run)

    def run(self) -> TrainResult:
        accelerator = self.accelerator
        if accelerator.is_local_main_process:
            self.metrics.serve()
        self.stop = StopRequest.install()
        try:
            setup = self._build()
            state = self._resume(setup.config)
            self._loop(setup, state)
            accelerator.wait_for_everyone()
            result = self._finish(setup, state)
            accelerator.wait_for_everyone()
            return result
        finally:
            self.stop.restore()
            # Asked to stop: the grace period is for the checkpoint, not for a last scrape.
            self.metrics.close(0 if self.stop.requested else None)
            _reset_single_process_accelerate()

    # ---------------------------------------------------------------- before the loop

    def _build(self) -> _Setup:
        """Tokenizer, model (LoRA), rows, plan, optimizer and scheduler, prepared by Accelerate."""
        import torch
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        from kubetune_trainer.modeling import (
            embedding_rows,
            load_model,
            load_tokenizer,
            model_config_dict,
        )

        ctx, t, accelerator = self.ctx, self.t, self.accelerator
        set_seed(t.seed)
        # Node-local scratch: the first process of each node downloads, the others reuse.
        with accelerator.local_main_process_first():
            tokenizer = load_tokenizer(ctx)
            eos = int(tokenizer.eos_token_id)
            model = load_model(
                ctx.job.spec.model,
                ctx,
                len(tokenizer),
                seed=t.seed,
                eos_token_id=eos,
                dropout=t.dropout,
            )
            rows = load_training_rows(
                ctx, eos, embedding_rows(model), bos_id=context_token_id(tokenizer)
            )
            validation = (
                load_validation_rows(
                    ctx, eos, embedding_rows(model), bos_id=context_token_id(tokenizer)
                )
                if t.validation is not None
                else None
            )
        attn = str(getattr(model.config, "_attn_implementation", "eager"))
        if t.packing and t.max_seq_length > getattr(model.config, "n_positions", t.max_seq_length):
            raise StageError(
                f"training.maxSeqLength {t.max_seq_length} exceeds the model's context "
                f"({model.config.n_positions} positions); lower it",
                reason=Reason.INVALID_SPEC,
            )
        if t.lora is not None:
            model = apply_lora(model, ctx)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        plan = make_plan(len(rows), t, accelerator.num_processes)
        # Exported as soon as it is known: a scrape during the set-up below already shows
        # the run's length (a short run can finish between two scrapes of its loop).
        self.metrics.set_total_steps(plan.total_steps)
        config = self._resolved_config(
            plan, rows, attn, n_params, n_trainable, model_config_dict(model)
        )
        if validation is not None:
            config["validationRows"] = len(validation)
            config["validationTargets"] = validation.targets
        optimizer = _optimizer(model, t)
        scheduler = get_scheduler(
            str(t.scheduler),
            optimizer,
            num_warmup_steps=plan.warmup_steps,
            num_training_steps=plan.total_steps,
        )
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
        source = BatchSource(
            rows, plan, accelerator.process_index, t.seed, int(tokenizer.pad_token_id)
        )
        if accelerator.is_main_process:
            log.info(
                "training %s: %d rows (%d tokens, %d trained on%s, packing %s, efficiency "
                "%.1f%%), %d steps of %d rows, %s, precision %s, attention %s, %d/%d trainable "
                "parameters",
                ctx.job.spec.model.display_name,
                len(rows),
                rows.tokens,
                rows.targets,
                ": answers only" if rows.trained is not None else "",
                t.packing,
                100 * rows.efficiency,
                plan.total_steps,
                plan.global_batch * plan.grad_accum,
                _device_name(accelerator),
                self.mixed_precision,
                attn,
                n_trainable,
                n_params,
            )
            if validation is not None and t.validation is not None:
                log.info(
                    "validation every %d steps on %d rows (%d targets)%s%s",
                    t.validation.every_steps,
                    len(validation),
                    validation.targets,
                    f", early stopping after {t.validation.early_stopping_patience} without an "
                    f"improvement of {t.validation.min_delta}"
                    if t.validation.early_stopping_patience
                    else "",
                    ", keeping the best weights" if t.validation.keep_best else "",
                )
        mask_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision, torch.float32
        )
        return _Setup(
            model,
            tokenizer,
            optimizer,
            scheduler,
            source,
            plan,
            config,
            attn,
            mask_dtype,
            validation,
        )

    def _resolved_config(
        self,
        plan: Plan,
        rows: Rows,
        attn: str,
        n_params: int,
        n_trainable: int,
        model_config: dict[str, Any],
    ) -> dict[str, Any]:
        t = self.t
        return {
            "job": self.ctx.job.metadata.name,
            "model": self.ctx.job.spec.model.display_name,
            "training": t.to_wire(),
            "mixedPrecision": self.mixed_precision,
            "attnImplementation": attn,
            "numProcesses": plan.num_processes,
            "rows": plan.rows,
            # Real tokens (what tokens/s and trainTokens count, bos/eos and prompts included)
            # and, of those, the targets the loss averages over: for text every token but a
            # segment's first (bos), for instruction datasets the answer tokens and their eos.
            "trainTokensPerEpoch": rows.tokens,
            "trainTargetsPerEpoch": rows.targets,
            "lossOn": "answers" if rows.trained is not None else "allTokens",
            "packingEfficiency": round(rows.efficiency, 4),
            "microBatchesPerEpoch": plan.micro_per_epoch,
            "sequencesPerStep": plan.global_batch * plan.grad_accum,
            "totalSteps": plan.total_steps,
            "warmupSteps": plan.warmup_steps,
            "parameters": n_params,
            "trainableParameters": n_trainable,
            "modelConfig": model_config,
            "trainingFingerprint": self.identity.fingerprint,
            "trainingInputs": self.identity.inputs,
        }

    def _resume(self, config: dict[str, Any]) -> ckpt.TrainerState:
        """Load the newest complete checkpoint, or a fresh state at step 0."""
        ctx, accelerator = self.ctx, self.accelerator
        latest = ckpt.latest_complete(self.checkpoints)
        if latest is None:
            if accelerator.is_main_process:
                self._explain_fresh_start()
            return ckpt.TrainerState(
                step=0,
                epoch=0.0,
                epoch_index=0,
                batches_done_in_epoch=0,
                tokens_seen=0,
                config=config,
            )
        step, key = latest
        local = ctx.scratch / "resume" / key
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
            ckpt.download_checkpoint(self.checkpoints, key, local)
        accelerator.wait_for_everyone()
        state = ckpt.TrainerState.from_json((local / ckpt.STATE_FILE).read_text("utf-8"))
        _check_resume(state, self.identity, self.checkpoints.uri(key))
        accelerator.load_state(str(local))
        self.resumed_from = self.last_checkpoint = state.step
        if self.t.validation is not None:
            self.stopper = EarlyStopping.from_state(self.t.validation, state.validation)
        if accelerator.is_main_process:
            log.info(
                "resumed from %s (step %d, epoch %.2f%s)",
                self.checkpoints.uri(key),
                step,
                state.epoch,
                self._validation_summary(),
            )
            self._list_checkpoints()
        state.config = config
        return state

    # ---------------------------------------------------------------- the loop

    def _loop(self, setup: _Setup, state: ckpt.TrainerState) -> None:
        """Optimizer steps from ``state.step`` to the plan's end, then the last checkpoint."""
        plan, source = setup.plan, setup.source
        self._start_observing(plan, state)
        setup.model.train()
        for step in range(state.step, plan.total_steps):
            if state.stopped_early:  # early stopping (or resumed from where it stopped)
                break
            micro = [source.batch(step * plan.grad_accum + j) for j in range(plan.grad_accum)]
            nlls = self._step(setup, micro)
            self._after_step(setup, state, micro, nlls)
            if self.stop.agreed(self.accelerator):
                self._stop_observing()
                self._interrupt(state)
        self._stop_observing()
        if self.last_checkpoint != state.step:  # e.g. resumed exactly at the end
            self._save(state)

    def _interrupt(self, state: ckpt.TrainerState) -> None:
        """Asked to stop (SIGTERM): make sure this step is a complete checkpoint, then stop.

        Raises :class:`~kubetune.contract.Interrupted`: the pod exits ``INTERRUPTED``, which
        its Job does not count as a failure, and the next attempt resumes at this step.
        """
        if self.last_checkpoint != state.step:
            state.elapsed_seconds = self.elapsed_before + self.loop_seconds
            self._save(state)
        if self.accelerator.is_main_process:
            self.progress.count_preemption()  # the pod will be gone: storage remembers
            self.progress.flush()
        raise Interrupted(
            f"stopped on SIGTERM after step {state.step}; the complete checkpoint of step "
            f"{state.step} is in {self.checkpoints.uri('')} and the next attempt resumes "
            "from it",
            checkpoint_step=state.step,
        )

    def _step(self, setup: _Setup, micro: list[MicroBatch]) -> list[torch.Tensor]:
        """One optimizer step over this process's share of ``micro``; each micro-batch's NLL.

        The loss is token-weighted over the whole step and every process: each
        micro-batch's summed NLL times :func:`loss_scale` of the step's targets.
        """
        import torch

        from kubetune_trainer.packing import model_inputs, token_nll_sum

        accelerator, model, optimizer = self.accelerator, setup.model, setup.optimizer
        scale = loss_scale(setup.plan, sum(m.targets for m in micro))
        nlls = []
        for m in micro:
            batch = {
                k: torch.from_numpy(v).to(accelerator.device, non_blocking=True)
                for k, v in m.arrays.items()
            }
            inputs = model_inputs(
                batch,
                packed=self.t.packing,
                attn_implementation=setup.attn,
                mask_dtype=setup.mask_dtype,
            )
            with accelerator.accumulate(model):
                nll = token_nll_sum(model(**inputs).logits, batch["labels"])
                accelerator.backward(nll * scale)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), self.t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            nlls.append(nll.detach())
        if not accelerator.optimizer_step_was_skipped:
            setup.scheduler.step()
        return nlls

    # ---------------------------------------------------------------- around the step

    def _start_observing(self, plan: Plan, state: ckpt.TrainerState) -> None:
        """Progress file, metrics, bar and clocks, at the loop's first step (resumed or not)."""
        main = self.accelerator.is_main_process
        if main and state.step > 0:
            self.progress.resume(state.step)
        if main and self.ctx.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=plan.total_steps,
                initial=state.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"train {self.ctx.job.metadata.name}",
            )
        self.first_step = state.step
        self.elapsed_before = state.elapsed_seconds
        self.loop_start = self.window.started = time.perf_counter()

    def _after_step(
        self,
        setup: _Setup,
        state: ckpt.TrainerState,
        micro: list[MicroBatch],
        nlls: list[torch.Tensor],
    ) -> None:
        """All but the step: advance the state, sum the window, log, bar, checkpoint cadence."""
        import torch

        plan, t, window = setup.plan, self.t, self.window
        done = state.step + 1
        step_tokens = sum(m.tokens for m in micro)
        next_micro = done * plan.grad_accum
        state.step = done
        state.epoch = next_micro / plan.micro_per_epoch
        state.epoch_index, state.batches_done_in_epoch = setup.source.position(next_micro)
        state.tokens_seen += step_tokens
        self.loop_tokens += step_tokens
        for nll in nlls:
            window.nll += nll
            window.first_bad_step = torch.where(
                (window.first_bad_step < 0) & ~torch.isfinite(nll),
                torch.full_like(window.first_bad_step, done),
                window.first_bad_step,
            )
        window.targets += sum(m.targets for m in micro)
        window.tokens += step_tokens
        if self.bar is not None:
            self.bar.update(1)

        v = t.validation
        is_validation = v is not None and (done % v.every_steps == 0 or done == plan.total_steps)
        improved = self._validate(setup, state) if is_validation else False
        state.validation_loss = self._last_validation_loss() if is_validation else None
        is_checkpoint = (
            done % t.checkpoint_every_steps == 0
            or done == plan.total_steps
            or state.stopped_early
            # The best weights are kept in storage: model/ is made of them at the end.
            or (improved and v is not None and v.keep_best)
        )
        if (
            done % t.log_every_steps == 0
            or is_checkpoint
            or is_validation
            or done == self.first_step + 1
        ):
            self._log_window(setup, state)
        if is_checkpoint:
            state.elapsed_seconds = self.elapsed_before + time.perf_counter() - self.loop_start
            self._save(state)
            if self.accelerator.is_main_process:
                self.progress.flush()

    def _log_window(self, setup: _Setup, state: ckpt.TrainerState) -> None:
        """The window's loss to metrics, progress file and bar; stops on a non-finite loss.

        The only host syncs of the loop: here, every logEverySteps.
        """
        accelerator, plan, window, done = self.accelerator, setup.plan, self.window, state.step
        nll = float(accelerator.reduce(window.nll, reduction="sum").item())
        first_bad = int(accelerator.reduce(window.first_bad_step, reduction="max").item())
        if first_bad >= 0 or not math.isfinite(nll):
            self.metrics.count_nonfinite()
            raise StageError(
                f"training loss became nan at step {first_bad if first_bad >= 0 else done}"
                "; lower training.learningRate or use precision fp32/bf16",
                reason=Reason.STAGE_FAILED,
            )
        loss = nll / max(window.targets, 1)
        self.final_loss = state.loss = loss
        now = time.perf_counter()
        tps = window.tokens / max(now - window.started, 1e-9)
        elapsed = now - self.loop_start
        eta = elapsed / (done - self.first_step) * (plan.total_steps - done)
        lr = float(setup.scheduler.get_last_lr()[0])
        if accelerator.is_local_main_process:
            self.metrics.update(
                step=done,
                total_steps=plan.total_steps,
                epoch=state.epoch,
                loss=loss,
                learning_rate=lr,
                tokens_per_second=tps,
                eta_seconds=eta,
                new_tokens=window.tokens,
            )
        if accelerator.is_main_process:
            record: dict[str, Any] = {
                "step": done,
                "epoch": round(state.epoch, 5),
                "loss": loss,
                "lr": lr,
                "tokens_per_second": tps,
                "elapsed": self.elapsed_before + elapsed,
            }
            if self.validated_at == done:
                record["validation_loss"] = self._last_validation_loss()
            progress = Progress(
                step=done,
                total_steps=plan.total_steps,
                percent=int(100 * done / plan.total_steps),
                epoch=round(state.epoch, 4),
                loss=round(loss, 5),
                tokens_per_second=round(tps, 1),
                eta_seconds=round(eta, 1),
                updated_at=rfc3339_now(),
            )
            if state.stopped_early:  # the training is done: nothing is left to wait for
                progress.percent, progress.eta_seconds = 100, 0.0
            self.progress.log(record, self._with_validation(progress))
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{tps:,.0f}"}
            if self.validated_at is not None and self._last_validation_loss() is not None:
                postfix["val"] = f"{self._last_validation_loss():.4f}"
            self.bar.set_postfix(postfix, refresh=False)
        window.nll.zero_()
        window.targets = 0
        window.tokens = 0
        window.started = now

    # ---------------------------------------------------------------- validation

    def _validate(self, setup: _Setup, state: ckpt.TrainerState) -> bool:
        """Score the validation split now; True when it is the lowest loss so far.

        Every process scores its shard of the rows (no collective until the sums are
        added up, so shards of different sizes cannot hang); the model goes back to
        train mode after.
        """
        import torch

        accelerator, rows, stopper = self.accelerator, setup.validation, self.stopper
        assert rows is not None and stopper is not None
        started = time.perf_counter()
        setup.model.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                nll, targets = validation_nll(
                    # The module itself: a DDP forward would sync buffers (a collective).
                    accelerator.unwrap_model(setup.model),
                    rows,
                    batch_size=self.t.batch_size,
                    pad_id=setup.source.pad_id,
                    device=accelerator.device,
                    attn_implementation=setup.attn,
                    mask_dtype=setup.mask_dtype,
                    rank=accelerator.process_index,
                    world=accelerator.num_processes,
                )
        finally:
            setup.model.train()
        dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
        sums = torch.tensor([nll, float(targets)], dtype=dtype, device=accelerator.device)
        sums = accelerator.reduce(sums, reduction="sum")
        total_nll, total_targets = float(sums[0].item()), float(sums[1].item())
        loss = total_nll / max(total_targets, 1.0)
        decision = stopper.update(state.step, loss)
        self.validated_at = state.step
        state.validation = stopper.to_state()
        state.stopped_early = decision.stop
        if accelerator.is_local_main_process:
            self.metrics.update_validation(loss, stopper.best_loss)
        if accelerator.is_main_process:
            v = self.t.validation
            log.info(
                "step %d: validation loss %.4f (perplexity %s) in %.1fs%s%s",
                state.step,
                loss,
                _perplexity(loss),
                time.perf_counter() - started,
                " (best so far)" if decision.improved else self._validation_summary(),
                f"; stopping early: no improvement of {v.min_delta if v else 0} in "
                f"{stopper.bad} validations (best {stopper.best_loss:.4f} at step "
                f"{stopper.best_step})"
                if decision.stop
                else "",
            )
        return decision.improved

    def _last_validation_loss(self) -> float | None:
        """The latest validation loss, rounded; None before the first and when not finite."""
        last = self.stopper.last_loss if self.stopper is not None else None
        if last is None or not math.isfinite(last):
            return None
        return round(last, 6)

    def _best_step(self) -> int | None:
        return self.stopper.best_step if self.stopper is not None else None

    def _validation_summary(self) -> str:
        """``; best validation loss X at step N`` for log lines ('' without validation)."""
        stopper = self.stopper
        if stopper is None or stopper.best_loss is None:
            return ""
        return (
            f"; best validation loss {stopper.best_loss:.4f} at step {stopper.best_step}, "
            f"{stopper.bad} validation(s) since without an improvement"
        )

    def _with_validation(self, progress: Progress) -> Progress:
        """``progress`` with the validation fields (training.validation only)."""
        stopper = self.stopper
        if stopper is None:
            return progress
        last = self._last_validation_loss()
        progress.validation_loss = last
        progress.validation_perplexity = _perplexity(last)
        progress.best_validation_loss = (
            round(stopper.best_loss, 6) if stopper.best_loss is not None else None
        )
        progress.best_step = stopper.best_step
        progress.stopped_early = stopper.stopped
        return progress

    def _list_checkpoints(self) -> None:
        """The complete checkpoints, from storage, into progress.json (main process)."""
        self.progress.set_checkpoints(ckpt.checkpoint_records(self.checkpoints, self._best_step()))

    def _stop_observing(self) -> None:
        """Close the bar, stop the loop's clock, write the progress file."""
        if self.bar is not None:
            self.bar.close()
        self.loop_seconds = time.perf_counter() - self.loop_start
        if self.accelerator.is_main_process:
            self.progress.flush()

    def _save(self, state: ckpt.TrainerState) -> None:
        """save_state to scratch, upload, marker last, prune (main process writes)."""
        ctx, accelerator = self.ctx, self.accelerator
        local = ctx.scratch / "checkpoint" / f"step-{state.step:08d}"
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(local))
        if accelerator.is_main_process:
            ckpt.begin_checkpoint(self.checkpoints, state.step)
        accelerator.wait_for_everyone()
        files = sorted(p for p in local.rglob("*") if p.is_file())
        if accelerator.is_main_process:
            ckpt.upload_files(self.checkpoints, local, state.step, files)
        elif accelerator.is_local_main_process:
            # Another node: only its processes' RNG states are not on the main node.
            ckpt.upload_files(
                self.checkpoints,
                local,
                state.step,
                [p for p in files if p.name.startswith("random_states_")],
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            key = ckpt.finish_checkpoint(self.checkpoints, state)
            pruned = ckpt.prune_checkpoints(
                self.checkpoints, self.t.keep_checkpoints, protect=[self._best_step()]
            )
            log.info(
                "checkpoint %s%s",
                self.checkpoints.uri(key),
                f" (pruned steps {pruned})" if pruned else "",
            )
            self._list_checkpoints()
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        self.last_checkpoint = state.step

    # ---------------------------------------------------------------- after the loop

    def _finish(self, setup: _Setup, state: ckpt.TrainerState) -> TrainResult:
        """train.json and the standalone model (main process writes)."""
        from kubetune_trainer.modeling import save_model

        ctx, accelerator = self.ctx, self.accelerator
        final_loss = self.final_loss if self.final_loss is not None else self._last_logged_loss()
        stopper = self.stopper
        model_step = self._model_step(state)
        result = TrainResult(
            run=ctx.run_identity,
            steps=state.step,
            total_steps=setup.plan.total_steps,
            epochs=round(state.epoch, 4),
            final_loss=final_loss,
            train_tokens=state.tokens_seen,
            tokens_per_second=round(self.loop_tokens / self.loop_seconds, 1)
            if self.loop_seconds > 0 and self.loop_tokens
            else None,
            model_uri=ctx.storage.uri(RunLayout.MODEL),
            dataset_fingerprint=self.identity.dataset_fingerprint,
            training_fingerprint=self.identity.fingerprint,
            last_checkpoint=self.checkpoints.uri(RunLayout.checkpoint_key(state.step)),
            resumed_from_step=self.resumed_from,
            preemptions=self.progress.preemptions,
            seconds=round(time.time() - self.started, 2),
            device=_device_name(accelerator),
            config=setup.config,
            validation_loss=self._last_validation_loss(),
            best_validation_loss=round(stopper.best_loss, 6)
            if stopper is not None and stopper.best_loss is not None
            else None,
            best_step=self._best_step(),
            stopped_early=state.stopped_early,
            model_step=model_step,
            checkpoints=ckpt.checkpoint_records(self.checkpoints, self._best_step()),
        )
        if accelerator.is_main_process:
            local = ctx.scratch / "model"
            shutil.rmtree(local, ignore_errors=True)
            model = accelerator.unwrap_model(setup.model)
            if model_step != state.step:
                # keepBest: the weights of the best step (its checkpoint is never pruned).
                key = RunLayout.checkpoint_key(model_step)
                weights = ckpt.download_weights(
                    self.checkpoints, key, ctx.scratch / "best-checkpoint"
                )
                ckpt.load_weights(model, weights)
                log.info(
                    "model/ gets the weights of step %d (validation loss %.4f, the lowest; "
                    "training.validation.keepBest) from %s",
                    model_step,
                    stopper.best_loss if stopper and stopper.best_loss is not None else math.nan,
                    self.checkpoints.uri(key),
                )
            save_model(model, setup.tokenizer, local)
            # What the model was trained on: evaluate scores it only on this dataset's test split.
            record = TrainingRecord(
                dataset_fingerprint=self.identity.prepared.fingerprint,
                train_sha256=self.identity.prepared.train_sha256,
                training_fingerprint=self.identity.fingerprint,
                dataset_inputs=self.identity.prepared.fingerprint_inputs,
                training_inputs=self.identity.inputs,
                steps=state.step,
                model_step=model_step,
                validation_loss=self._validation_loss_at(model_step),
            )
            (local / Path(RunLayout.MODEL_RECORD).name).write_text(record.to_json())
            ctx.storage.delete(RunLayout.MODEL)
            ctx.storage.upload_dir(local, RunLayout.MODEL)
            ctx.storage.write_text(RunLayout.TRAIN_RESULT, result.to_json())
            log.info(
                "trained %d steps (loss %s) -> %s",
                state.step,
                f"{final_loss:.4f}" if final_loss is not None else "n/a",
                result.model_uri,
            )
        return result

    def _validation_loss_at(self, step: int) -> float | None:
        """The validation loss at ``step`` when it was the best or the latest validation."""
        stopper = self.stopper
        if stopper is None:
            return None
        for at, loss in (
            (stopper.best_step, stopper.best_loss),
            (stopper.last_step, stopper.last_loss),
        ):
            if at == step and loss is not None and math.isfinite(loss):
                return round(loss, 6)
        return None

    def _model_step(self, state: ckpt.TrainerState) -> int:
        """The step whose weights become model/: the best one with keepBest, else the last."""
        v, best = self.t.validation, self._best_step()
        if v is None or not v.keep_best or best is None or best == state.step:
            return state.step
        complete, _ = ckpt.list_checkpoints(self.checkpoints)
        if best not in complete:
            log.warning(
                "the best validation step %d has no checkpoint (pruned by an older run?); "
                "model/ gets the last weights (step %d)",
                best,
                state.step,
            )
            return state.step
        return best

    def _explain_fresh_start(self) -> None:
        """Say why an earlier training run under this output is not continued."""
        for key in sorted(
            {k.split("/")[1] for k in self.ctx.storage.list(RunLayout.TRAINING_RUNS)}
        ):
            other = self.ctx.storage.sub(f"{RunLayout.TRAINING_RUNS}/{key}")
            latest = ckpt.latest_complete(other)
            if latest is None or other.root == self.checkpoints.root:
                continue
            state = ckpt.TrainerState.from_json(other.read_text(f"{latest[1]}/{ckpt.STATE_FILE}"))
            what = changed(state.config.get("trainingInputs") or {}, self.identity.inputs)
            log.info(
                "not resuming %s (step %d): it trained on something else (%s); starting a new "
                "training run in %s",
                other.uri(latest[1]),
                latest[0],
                "; ".join(what) or "other settings",
                self.checkpoints.uri(),
            )

    def _last_logged_loss(self) -> float | None:
        """The loss of the last metrics line (a run resumed at its end logs none itself)."""
        import json

        if not self.progress.lines:
            return None
        value = json.loads(self.progress.lines[-1]).get("loss")
        return float(value) if value is not None else None


def _perplexity(loss: float | None) -> float | None:
    """exp(loss), rounded; None when there is no loss or it overflows."""
    if loss is None or not math.isfinite(loss) or loss > 700:
        return None
    return round(math.exp(loss), 4)


def run(ctx: StageContext) -> TrainResult:
    """Train (or continue training) the job's model; returns the result written to train.json."""
    return _Trainer(ctx).run()
