"""The train stage: an Accelerate loop over packed blocks, with resumable checkpoints.

Run it::

    kubetune train --job job.yaml [--output file:///runs/x]        # one process
    accelerate launch -m kubetune.cli train --job job.yaml  # several GPUs / nodes

or call ``run(ctx)`` in process (``kubetune run job.yaml`` does). It reads
``dataset/`` (prepare's token arrays and tokenizer), writes ``checkpoints/``,
``train/progress.json`` + ``train/metrics.jsonl`` while it runs, then the
standalone model under ``model/`` and finally ``train/train.json``.

The loop is the Accelerate examples' (``prepare``, ``accumulate``,
``clip_grad_norm_``, ``save_state``/``load_state``) with these choices:

* data: prepare's lines, each + eos, packed greedily into ``maxSeqLength`` blocks
  with no attention across lines (:mod:`kubetune_trainer.packing`); one seeded
  shuffle per epoch. Optimizer step ``s`` consumes global micro-batches
  ``s*GA .. s*GA+GA-1`` of the endless sequence of epochs, so the position in the
  data is a pure function of the step and a resume continues the same order;
* sharding: global micro-batch = ``batchSize * num_processes`` blocks; process
  ``r`` takes slice ``r``; the last partial batch of an epoch wraps around when
  there are several processes (as ``DistributedSampler`` pads) so all ranks step
  together;
* loss: summed token NLL of the micro-batch divided by the predicted tokens of
  the whole optimizer step (token-weighted, not a mean of micro-batch means);
* no host sync per step: the loss stays on the device until a log step;
* the LR scheduler is stepped by us once per optimizer step (Accelerate's prepared
  scheduler would step once per process) and registered for checkpointing.
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

from kubetune.contract import StageError
from kubetune.layout import RunLayout
from kubetune.results import TrainResult
from kubetune.schema import Progress, Reason, TrainingSpec
from kubetune.storage import StorageError
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.bleu import context_token_id
from kubetune_trainer.context import StageContext
from kubetune_trainer.exporter import ProgressWriter, TrainMetrics, rfc3339_now
from kubetune_trainer.packing import Rows, build_rows, collate, count_targets

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger(__name__)

# Spec fields that decide the data order and the step count: a checkpoint made
# with other values cannot be continued.
RESUME_KEYS = (
    "batchSize",
    "gradientAccumulationSteps",
    "maxSeqLength",
    "packing",
    "seed",
    "epochs",
    "maxSteps",
)


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


class BatchSource:
    """Micro-batches by global index: a seeded permutation per epoch, sharded by rank."""

    def __init__(self, rows: Rows, plan: Plan, rank: int, seed: int, pad_id: int) -> None:
        self.rows = rows
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.pad_id = pad_id
        self.row_lengths = rows.row_lengths()
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

    def batch(self, micro: int) -> tuple[dict[str, np.ndarray], int]:
        """This process's batch and the real tokens of the whole global micro-batch."""
        idx = self.global_indices(micro)
        tokens = int(self.row_lengths[idx].sum())
        if self.plan.num_processes > 1:
            b = self.plan.batch_size
            idx = idx[self.rank * b : (self.rank + 1) * b]
        return collate(self.rows, idx, self.pad_id), tokens


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


def _load_array(ctx: StageContext, key: str, local: Path) -> np.ndarray:
    if not local.exists():
        try:
            ctx.storage.download_file(key, local)
        except StorageError as exc:
            raise StageError(
                f"{ctx.storage.uri(key)}: {exc}; run the prepare stage first (it writes the "
                "tokenized training split there)",
                reason=Reason.DATASET_UNUSABLE,
            ) from None
    return np.load(local, mmap_mode="r")


def load_training_rows(
    ctx: StageContext, eos_id: int, vocab_size: int, bos_id: int | None = None
) -> Rows:
    """Prepare's train token arrays -> training rows (packed or not)."""
    t = ctx.job.spec.training
    scratch = ctx.scratch_dir("dataset")
    tokens = _load_array(ctx, RunLayout.TRAIN_TOKENS, scratch / "train.tokens.npy")
    offsets = _load_array(ctx, RunLayout.TRAIN_OFFSETS, scratch / "train.offsets.npy")
    where = ctx.storage.uri(RunLayout.TRAIN_OFFSETS)
    if offsets.ndim != 1 or len(offsets) < 2 or int(offsets[0]) != 0:
        raise StageError(
            f"{where}: expected int64 line offsets starting at 0 (lines + 1 values)",
            reason=Reason.DATASET_UNUSABLE,
        )
    if int(offsets[-1]) != len(tokens) or (np.diff(offsets) < 0).any():
        raise StageError(
            f"{where}: offsets do not match {RunLayout.TRAIN_TOKENS} ({int(offsets[-1])} vs "
            f"{len(tokens)} tokens); re-run the prepare stage",
            reason=Reason.DATASET_UNUSABLE,
        )
    if len(tokens) == 0:
        raise StageError(
            f"{ctx.storage.uri(RunLayout.TRAIN_TOKENS)}: the training split has no "
            "tokens; check dataset.source and dataset.clean",
            reason=Reason.DATASET_UNUSABLE,
        )
    top = int(tokens.max())
    if top >= vocab_size:
        raise StageError(
            f"{ctx.storage.uri(RunLayout.TRAIN_TOKENS)}: token id {top} is outside the model's "
            f"vocabulary ({vocab_size}); the dataset was tokenized with another tokenizer, re-run "
            "prepare",
            reason=Reason.DATASET_UNUSABLE,
        )
    # Lines start with the token evaluation scores from (bos, else eos): see packing.py.
    return build_rows(
        tokens,
        offsets,
        block_size=t.max_seq_length,
        eos_id=eos_id,
        bos_id=bos_id if bos_id is not None else eos_id,
        packing=t.packing,
    )


def apply_lora(model: Any, ctx: StageContext) -> Any:
    """Wrap ``model`` with peft LoRA adapters (spec.training.lora)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    lora = ctx.job.spec.training.lora
    assert lora is not None
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
    # Fused on GPU; on CPU torch would otherwise update one tensor at a time.
    if any(p.is_cuda for p in decay + no_decay):
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


def _check_resume(state: ckpt.TrainerState, config: dict[str, Any], key: str) -> None:
    old = state.config.get("training", {})
    new = config["training"]
    diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if state.config.get("model") != config["model"]:
        diff.append("model")
    if state.config.get("numProcesses") != config["numProcesses"]:
        diff.append("numProcesses")
    if diff:
        raise StageError(
            f"checkpoint {key} was made with different {', '.join(diff)}; it cannot be continued. "
            "Use a new storage.output for the changed spec, or delete checkpoints/ to start over",
            reason=Reason.INVALID_SPEC,
        )


# --------------------------------------------------------------------------- the loop


class _Trainer:
    """One attempt of the train stage (state shared by the loop's helpers)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.t = ctx.job.spec.training
        self.started = time.time()
        self.resumed_from: int | None = None  # step of the checkpoint this attempt started from
        self.last_checkpoint: int | None = None  # step of the newest checkpoint written/loaded

    def run(self) -> TrainResult:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        from kubetune_trainer.modeling import (
            embedding_rows,
            load_model,
            load_tokenizer,
            model_config_dict,
        )

        ctx, t = self.ctx, self.t
        mixed = resolve_precision(str(t.precision), torch.cuda.is_available())
        _reset_single_process_accelerate()
        accelerator = Accelerator(
            mixed_precision=mixed, gradient_accumulation_steps=t.gradient_accumulation_steps
        )
        self.accelerator = accelerator
        main = accelerator.is_main_process
        set_seed(t.seed)

        metrics = TrainMetrics(ctx.job.metadata.name, ctx.job.metadata.namespace)
        self.metrics = metrics
        if accelerator.is_local_main_process:
            metrics.serve()
        try:
            # Node-local scratch: the first process of each node downloads, the others reuse.
            with accelerator.local_main_process_first():
                tokenizer = load_tokenizer(ctx)
                eos = int(tokenizer.eos_token_id)
                model = load_model(
                    ctx.job.spec.model, ctx, len(tokenizer), seed=t.seed, eos_token_id=eos
                )
                rows = load_training_rows(
                    ctx, eos, embedding_rows(model), bos_id=context_token_id(tokenizer)
                )
            attn = str(getattr(model.config, "_attn_implementation", "eager"))
            if t.packing and t.max_seq_length > getattr(
                model.config, "n_positions", t.max_seq_length
            ):
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
            config = self._resolved_config(
                plan, rows, mixed, attn, n_params, n_trainable, model_config_dict(model)
            )
            optimizer = _optimizer(model, t)
            scheduler = get_scheduler(
                str(t.scheduler),
                optimizer,
                num_warmup_steps=plan.warmup_steps,
                num_training_steps=plan.total_steps,
            )
            model, optimizer = accelerator.prepare(model, optimizer)
            accelerator.register_for_checkpointing(scheduler)

            state = self._resume(config)
            source = BatchSource(
                rows, plan, accelerator.process_index, t.seed, int(tokenizer.pad_token_id)
            )
            if main:
                log.info(
                    "training %s: %d rows (%d tokens, packing %s, efficiency %.1f%%), %d steps "
                    "of %d rows, %s, precision %s, attention %s, %d/%d trainable parameters",
                    ctx.job.spec.model.display_name,
                    len(rows),
                    rows.tokens,
                    t.packing,
                    100 * rows.efficiency,
                    plan.total_steps,
                    plan.global_batch * plan.grad_accum,
                    _device_name(accelerator),
                    mixed,
                    attn,
                    n_trainable,
                    n_params,
                )
            final_loss, loop_tokens, loop_seconds = self._loop(
                model, optimizer, scheduler, source, plan, state, config, attn
            )
            accelerator.wait_for_everyone()
            result = self._finish(
                model, tokenizer, plan, state, config, final_loss, loop_tokens, loop_seconds
            )
            accelerator.wait_for_everyone()
            return result
        finally:
            metrics.close()
            _reset_single_process_accelerate()

    # ---------------------------------------------------------------- pieces

    def _resolved_config(
        self,
        plan: Plan,
        rows: Rows,
        mixed: str,
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
            "mixedPrecision": mixed,
            "attnImplementation": attn,
            "numProcesses": plan.num_processes,
            "rows": plan.rows,
            "trainTokensPerEpoch": rows.tokens,
            "packingEfficiency": round(rows.efficiency, 4),
            "microBatchesPerEpoch": plan.micro_per_epoch,
            "sequencesPerStep": plan.global_batch * plan.grad_accum,
            "totalSteps": plan.total_steps,
            "warmupSteps": plan.warmup_steps,
            "parameters": n_params,
            "trainableParameters": n_trainable,
            "modelConfig": model_config,
        }

    def _resume(self, config: dict[str, Any]) -> ckpt.TrainerState:
        """Load the newest complete checkpoint, or a fresh state at step 0."""
        ctx, accelerator = self.ctx, self.accelerator
        latest = ckpt.latest_complete(ctx.storage)
        if latest is None:
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
            ckpt.download_checkpoint(ctx.storage, key, local)
        accelerator.wait_for_everyone()
        state = ckpt.TrainerState.from_json((local / ckpt.STATE_FILE).read_text("utf-8"))
        _check_resume(state, config, key)
        accelerator.load_state(str(local))
        self.resumed_from = state.step
        if accelerator.is_main_process:
            log.info(
                "resumed from %s (step %d, epoch %.2f)", ctx.storage.uri(key), step, state.epoch
            )
        state.config = config
        return state

    def _save(self, state: ckpt.TrainerState) -> None:
        """save_state to scratch, upload, marker last, prune (main process writes)."""
        ctx, accelerator = self.ctx, self.accelerator
        local = ctx.scratch / "checkpoint" / f"step-{state.step:08d}"
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(local))
        if accelerator.is_main_process:
            ckpt.begin_checkpoint(ctx.storage, state.step)
        accelerator.wait_for_everyone()
        files = sorted(p for p in local.rglob("*") if p.is_file())
        if accelerator.is_main_process:
            ckpt.upload_files(ctx.storage, local, state.step, files)
        elif accelerator.is_local_main_process:
            # Another node: only its processes' RNG states are not on the main node.
            ckpt.upload_files(
                ctx.storage,
                local,
                state.step,
                [p for p in files if p.name.startswith("random_states_")],
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            key = ckpt.finish_checkpoint(ctx.storage, state)
            pruned = ckpt.prune_checkpoints(ctx.storage, self.t.keep_checkpoints)
            log.info(
                "checkpoint %s%s",
                ctx.storage.uri(key),
                f" (pruned steps {pruned})" if pruned else "",
            )
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        self.last_checkpoint = state.step

    def _loop(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        source: BatchSource,
        plan: Plan,
        state: ckpt.TrainerState,
        config: dict[str, Any],
        attn: str,
    ) -> tuple[float | None, int, float]:
        import torch

        from kubetune_trainer.packing import model_inputs, token_nll_sum

        ctx, t, accelerator, metrics = self.ctx, self.t, self.accelerator, self.metrics
        main = accelerator.is_main_process
        device = accelerator.device
        mask_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            accelerator.mixed_precision, torch.float32
        )
        progress = ProgressWriter(ctx.storage)
        if main and state.step > 0:
            progress.resume(state.step)
        metrics.set_total_steps(plan.total_steps)
        self.last_checkpoint = state.step if self.resumed_from is not None else None

        bar = None
        if main and ctx.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=plan.total_steps,
                initial=state.step,
                unit="step",
                dynamic_ncols=True,
                desc=f"train {ctx.job.metadata.name}",
            )

        model.train()
        nll_acc = torch.zeros((), device=device, dtype=torch.float32)
        targets_acc = 0
        bad_step = torch.full((), -1, device=device, dtype=torch.long)
        interval_tokens = 0
        loop_tokens = 0
        loop_start = time.perf_counter()
        interval_start = loop_start
        final_loss: float | None = None
        start_step = state.step
        prior_elapsed = state.elapsed_seconds

        for step in range(start_step, plan.total_steps):
            micro = [source.batch(step * plan.grad_accum + j) for j in range(plan.grad_accum)]
            step_targets = max(1, sum(count_targets(b["labels"]) for b, _ in micro))
            step_tokens = 0
            for batch_np, global_tokens in micro:
                batch = {
                    k: torch.from_numpy(v).to(device, non_blocking=True)
                    for k, v in batch_np.items()
                }
                with accelerator.accumulate(model):
                    logits = model(
                        **model_inputs(
                            batch, packed=t.packing, attn_implementation=attn, mask_dtype=mask_dtype
                        )
                    ).logits
                    nll = token_nll_sum(logits, batch["labels"])
                    # accelerator.backward divides by GA: the step's loss is sum NLL / targets.
                    accelerator.backward(nll * (plan.grad_accum / step_targets))
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                nll_acc += nll.detach()
                bad_step = torch.where(
                    (bad_step < 0) & ~torch.isfinite(nll),
                    torch.full_like(bad_step, step + 1),
                    bad_step,
                )
                targets_acc += count_targets(batch_np["labels"])
                step_tokens += global_tokens
            interval_tokens += step_tokens
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            done = step + 1
            m_next = done * plan.grad_accum
            state.step = done
            state.epoch = m_next / plan.micro_per_epoch
            state.epoch_index, state.batches_done_in_epoch = source.position(m_next)
            state.tokens_seen += step_tokens
            loop_tokens += step_tokens
            if bar is not None:
                bar.update(1)

            is_last = done == plan.total_steps
            is_ckpt = done % t.checkpoint_every_steps == 0 or is_last
            if done % t.log_every_steps == 0 or is_ckpt or done == start_step + 1:
                # The only host syncs of the loop: here, every logEverySteps.
                totals = accelerator.reduce(
                    torch.stack([nll_acc, torch.tensor(float(targets_acc), device=device)]),
                    reduction="sum",
                ).tolist()
                first_bad = int(accelerator.reduce(bad_step, reduction="max").item())
                if first_bad >= 0 or not math.isfinite(totals[0]):
                    metrics.count_nonfinite()
                    raise StageError(
                        f"training loss became nan at step {first_bad if first_bad >= 0 else done}"
                        "; lower training.learningRate or use precision fp32/bf16",
                        reason=Reason.STAGE_FAILED,
                    )
                loss = totals[0] / max(totals[1], 1.0)
                final_loss = loss
                now = time.perf_counter()
                tps = interval_tokens / max(now - interval_start, 1e-9)
                elapsed = now - loop_start
                eta = elapsed / (done - start_step) * (plan.total_steps - done)
                lr = float(scheduler.get_last_lr()[0])
                if accelerator.is_local_main_process:
                    metrics.update(
                        step=done,
                        total_steps=plan.total_steps,
                        epoch=state.epoch,
                        loss=loss,
                        learning_rate=lr,
                        tokens_per_second=tps,
                        eta_seconds=eta,
                        new_tokens=interval_tokens,
                    )
                if main:
                    record = {
                        "step": done,
                        "epoch": round(state.epoch, 5),
                        "loss": loss,
                        "lr": lr,
                        "tokens_per_second": tps,
                        "elapsed": prior_elapsed + elapsed,
                    }
                    progress.log(
                        record,
                        Progress(
                            step=done,
                            total_steps=plan.total_steps,
                            percent=int(100 * done / plan.total_steps),
                            epoch=round(state.epoch, 4),
                            loss=round(loss, 5),
                            tokens_per_second=round(tps, 1),
                            eta_seconds=round(eta, 1),
                            updated_at=rfc3339_now(),
                        ),
                    )
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False
                    )
                nll_acc.zero_()
                targets_acc = 0
                interval_tokens = 0
                interval_start = now
            if is_ckpt:
                state.elapsed_seconds = prior_elapsed + time.perf_counter() - loop_start
                self._save(state)
                if main:
                    progress.flush()
        if bar is not None:
            bar.close()
        loop_seconds = time.perf_counter() - loop_start
        if main:
            progress.flush()
        if self.last_checkpoint != plan.total_steps:  # e.g. resumed exactly at the end
            self._save(state)
        self.progress = progress
        return final_loss, loop_tokens, loop_seconds

    def _finish(
        self,
        model: Any,
        tokenizer: Any,
        plan: Plan,
        state: ckpt.TrainerState,
        config: dict[str, Any],
        final_loss: float | None,
        loop_tokens: int,
        loop_seconds: float,
    ) -> TrainResult:
        from kubetune_trainer.modeling import save_model

        ctx, accelerator = self.ctx, self.accelerator
        if final_loss is None:
            final_loss = self._last_logged_loss()
        result = TrainResult(
            steps=state.step,
            total_steps=plan.total_steps,
            epochs=round(state.epoch, 4),
            final_loss=final_loss,
            train_tokens=state.tokens_seen,
            tokens_per_second=round(loop_tokens / loop_seconds, 1)
            if loop_seconds > 0 and loop_tokens
            else None,
            model_uri=ctx.storage.uri(RunLayout.MODEL),
            last_checkpoint=ctx.storage.uri(RunLayout.checkpoint_key(state.step)),
            resumed_from_step=self.resumed_from,
            seconds=round(time.time() - self.started, 2),
            device=_device_name(accelerator),
            config=config,
        )
        if accelerator.is_main_process:
            local = ctx.scratch / "model"
            shutil.rmtree(local, ignore_errors=True)
            save_model(accelerator.unwrap_model(model), tokenizer, local)
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

    def _last_logged_loss(self) -> float | None:
        import json

        lines = getattr(self, "progress", None)
        if lines is None or not lines.lines:
            return None
        value = json.loads(lines.lines[-1]).get("loss")
        return float(value) if value is not None else None


def run(ctx: StageContext) -> TrainResult:
    """Train (or continue training) the job's model; returns the result written to train.json."""
    return _Trainer(ctx).run()
