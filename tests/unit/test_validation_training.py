"""Validation while training: the early-stopping decision, the validation loss, the checkpoint
list (pruning, progress.json, train.json, termination message, status) and the CLI options.

The end-to-end behaviour (a real training run) is in tests/integration/test_validation.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune.cli import build_parser
from kubetune.contract import TERMINATION_MESSAGE_LIMIT
from kubetune.layout import RunLayout
from kubetune.results import TrainResult
from kubetune.schema import CheckpointRecord, FineTuneJobStatus, Progress, ValidationSpec
from kubetune.storage import FileStorage
from kubetune_operator.reconcile import parse_progress
from kubetune_operator.status import RunView, checkpoints_from, compute_status, progress_from
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.exporter import ProgressWriter
from kubetune_trainer.packing import IGNORE_INDEX, build_rows
from kubetune_trainer.stages import termination_summary
from kubetune_trainer.validation import EarlyStopping, validation_nll

EOS = 0


# --------------------------------------------------------------------------- early stopping


def _run(stopper: EarlyStopping, losses: list[float], every: int = 10) -> list[tuple[bool, bool]]:
    out = []
    for i, loss in enumerate(losses, 1):
        d = stopper.update(i * every, loss)
        out.append((d.improved, d.stop))
    return out


def test_patience_counts_validations_in_a_row_without_an_improvement() -> None:
    stopper = EarlyStopping(patience=2)
    decisions = _run(stopper, [5.0, 4.0, 4.5, 3.9, 4.0, 4.0])
    assert decisions == [
        (True, False),
        (True, False),
        (False, False),  # one without improvement
        (True, False),  # an improvement resets the count
        (False, False),
        (False, True),  # equal is not better: the second in a row stops
    ]
    assert (stopper.best_loss, stopper.best_step, stopper.bad) == (3.9, 40, 2)
    assert stopper.stopped and stopper.last_step == 60


def test_min_delta_decides_patience_but_any_drop_is_the_best() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    decisions = _run(stopper, [5.0, 4.95, 4.92, 4.5])
    # 4.95 and 4.92 are new lows (keepBest keeps them) but no drop of 0.1: patience runs out.
    assert decisions == [(True, False), (True, False), (True, True), (True, False)]
    assert stopper.best_loss == 4.5 and stopper.best_step == 40


def test_no_patience_never_stops_and_a_nonfinite_loss_never_improves() -> None:
    stopper = EarlyStopping(patience=None)
    assert _run(stopper, [math.nan, 3.0, math.inf, *[4.0] * 50])[:3] == [
        (False, False),
        (True, False),
        (False, False),
    ]
    assert not stopper.stopped and stopper.best_loss == 3.0 and stopper.bad == 51
    assert json.dumps(stopper.to_state())  # JSON-safe (no NaN) after a non-finite loss


def test_the_state_through_a_checkpoint_continues_the_same_decision() -> None:
    spec = ValidationSpec(early_stopping_patience=3, min_delta=0.05)
    losses = [5.0, 4.0, 4.02, 3.99, 4.1, 4.2]
    straight = EarlyStopping.from_spec(spec)
    expected = _run(straight, losses)
    first = EarlyStopping.from_spec(spec)
    got = _run(first, losses[:3])
    state = json.loads(ckpt.TrainerState(1, 0, 0, 0, 0, validation=first.to_state()).to_json())
    resumed = EarlyStopping.from_state(spec, state["validation"])
    got += [(d.improved, d.stop) for d in (resumed.update(s * 10, x) for s, x in [(4, 3.99)])]
    got += [(d.improved, d.stop) for d in (resumed.update(s * 10, x) for s, x in [(5, 4.1)])]
    assert got == expected[:5] and resumed.bad == 3 and resumed.stopped
    assert resumed.best_step == straight.best_step == 40


# --------------------------------------------------------------------------- the loss


def _tiny_model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=200,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()


def _direct(model: torch.nn.Module, lines: list[list[int]], masks: list[list[int]] | None) -> float:
    """Summed NLL / targets, each line run alone as ``bos line eos`` (bos = eos)."""
    nll, n = 0.0, 0
    for i, line in enumerate(lines):
        ids = torch.tensor([[EOS, *line, EOS]])
        labels = ids.clone()
        labels[0, 0] = IGNORE_INDEX  # the start token is context only
        if masks is not None:  # answers only: prompt tokens are context, eos is trained
            trained = torch.tensor([0, *masks[i], 1], dtype=torch.bool)
            labels[0, ~trained] = IGNORE_INDEX
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        nll += float(
            torch.nn.functional.cross_entropy(
                logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        n += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return nll / n


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_validation_loss_equals_a_direct_computation(packing: bool, masked: bool) -> None:
    rng = np.random.default_rng(1)
    lines = [rng.integers(1, 200, n).tolist() for n in (5, 12, 3, 20, 9, 14, 7, 30, 11)]
    masks = [[0] * (len(x) // 2) + [1] * (len(x) - len(x) // 2) for x in lines] if masked else None
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])]).astype(np.int64)
    tokens = np.array([t for x in lines for t in x], dtype=np.uint32)
    mask = np.array([m for x in masks for m in x], dtype=np.uint8) if masks else None
    rows = build_rows(
        tokens, offsets, block_size=40, eos_id=EOS, bos_id=EOS, packing=packing, loss_mask=mask
    )
    model = _tiny_model()
    cpu = torch.device("cpu")
    kwargs = {"pad_id": EOS, "device": cpu, "mask_dtype": torch.float64}
    with torch.no_grad():
        nll, targets = validation_nll(model, rows, batch_size=2, **kwargs)
        # Three processes, each its shard: the sums add up to the one-process numbers.
        shards = [
            validation_nll(model, rows, batch_size=3, rank=r, world=3, **kwargs) for r in range(3)
        ]
    # token_nll_sum scores in float32, as training does
    assert nll / targets == pytest.approx(_direct(model, lines, masks), rel=1e-6)
    assert targets == rows.targets
    assert sum(s[1] for s in shards) == targets
    assert sum(s[0] for s in shards) == pytest.approx(nll, rel=1e-6)


# --------------------------------------------------------------------------- the checkpoint list


def _checkpoint(store: FileStorage, step: int, loss: float, val: float | None = None) -> None:
    store.write_text(f"{RunLayout.checkpoint_key(step)}/model.safetensors", "w")
    state = ckpt.TrainerState(step, 0.0, 0, 0, 0, loss=loss, validation_loss=val)
    ckpt.finish_checkpoint(store, state)


def test_pruning_keeps_the_newest_and_the_best_and_the_list_says_which(tmp_path: Path) -> None:
    store = FileStorage(f"file://{tmp_path}")
    for step, val in [(10, 3.0), (20, 2.5), (30, 2.7), (40, 2.8), (50, 2.9)]:
        _checkpoint(store, step, loss=10.0 / step, val=val)
        ckpt.prune_checkpoints(store, keep=2, protect=[20 if step >= 20 else 10])
    assert ckpt.list_checkpoints(store) == ([20, 40, 50], [])
    records = ckpt.checkpoint_records(store, best_step=20)
    assert [(r.step, r.best, r.validation_loss) for r in records] == [
        (20, True, 2.5),
        (40, False, 2.8),
        (50, False, 2.9),
    ]
    assert records[0].uri == store.uri(RunLayout.checkpoint_key(20))
    assert records[2].loss == pytest.approx(0.2)
    # Without validation there is no best flag; pruning is as before.
    assert ckpt.prune_checkpoints(store, keep=1) == [20, 40]
    assert [r.best for r in ckpt.checkpoint_records(store)] == [None]


def test_progress_json_carries_the_list_and_the_operator_reads_both(tmp_path: Path) -> None:
    store = FileStorage(f"file://{tmp_path}")
    writer = ProgressWriter(store)
    records = [
        CheckpointRecord(step=20, loss=2.0, validation_loss=2.5, uri="s3://b/c/20", best=True),
        CheckpointRecord(step=40, loss=1.8, validation_loss=2.6, uri="s3://b/c/40", best=False),
    ]
    writer.set_checkpoints(records)
    progress = Progress(step=40, total_steps=100, validation_loss=2.6, best_step=20)
    writer.log({"step": 40, "loss": 1.8, "validation_loss": 2.6}, progress)
    writer.flush()
    data = json.loads(store.read_text(RunLayout.PROGRESS))
    assert data["checkpoints"][0] == {
        "step": 20,
        "loss": 2.0,
        "validationLoss": 2.5,
        "uri": "s3://b/c/20",
        "best": True,
    }
    parsed = parse_progress(data)
    assert parsed is not None and parsed.validation_loss == 2.6 and parsed.best_step == 20
    assert checkpoints_from(data) == records
    assert checkpoints_from({"step": 1}) is None
    assert checkpoints_from({"checkpoints": [{"step": "x"}, records[0].to_wire()]}) == records[:1]


def _train_result(n_checkpoints: int, best: int | None) -> TrainResult:
    uri = "s3://a-rather-long-bucket-name/some/prefix/runs/0123abcd-g12/training/0123456789abcdef"
    return TrainResult(
        steps=100 * n_checkpoints,
        total_steps=100 * n_checkpoints,
        epochs=3.0,
        final_loss=1.234567,
        model_uri="s3://b/x/model",
        validation_loss=2.345678,
        best_validation_loss=2.123456,
        best_step=best,
        model_step=best,
        checkpoints=[
            CheckpointRecord(
                step=100 * i,
                loss=1.234567,
                validation_loss=2.345678,
                uri=f"{uri}/checkpoints/step-{100 * i:08d}",
                best=(100 * i == best) if best is not None else None,
            )
            for i in range(1, n_checkpoints + 1)
        ],
        config={"big": "x" * 10000},
    )


def test_the_termination_message_keeps_the_newest_and_the_best_under_4_kib() -> None:
    result = _train_result(101, best=300)
    summary = termination_summary(result)
    text = json.dumps(summary, separators=(",", ":"))
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    steps = [c["step"] for c in summary["checkpoints"]]
    assert steps[0] == 300 and steps[-1] == 10100 and steps == sorted(steps)
    assert 2 <= len(steps) <= 6
    assert summary["bestStep"] == 300 and summary["stoppedEarly"] is False
    small = termination_summary(_train_result(2, best=None))
    assert [c["step"] for c in small["checkpoints"]] == [100, 200]  # whole when it fits


def test_the_status_gets_validation_progress_and_the_checkpoint_list() -> None:
    from kubetune_operator.builders import RunRef
    from kubetune_operator.observe import StageObservation

    result = _train_result(3, best=200)
    result.stopped_early = True
    progress = progress_from(result)
    assert progress.validation_loss == 2.345678 and progress.best_step == 200
    assert progress.validation_perplexity == pytest.approx(math.exp(2.345678), abs=1e-4)
    assert progress.stopped_early is True and progress.percent == 100
    # Without validation the status says nothing about it.
    plain = progress_from(TrainResult(steps=1, total_steps=1, epochs=1.0, model_uri="m"))
    assert plain.stopped_early is None and plain.validation_loss is None

    run = RunRef(id="g1", generation=1, output="s3://b/x/runs/g1", spec_hash="abc")
    running = StageObservation(state="Running", start_time="2025-01-01T00:00:00Z")
    view = RunView(
        run=run,
        generation=1,
        stages={"prepare": StageObservation(state="Succeeded"), "train": running},
        progress=Progress(step=150, total_steps=300, validation_loss=2.4, best_step=100),
        checkpoints=result.checkpoints[:2],
    )
    status, _ = compute_status(FineTuneJobStatus(), view, now="2025-01-01T00:01:00Z")
    assert [c.step for c in status.checkpoints] == [100, 200]
    assert status.progress is not None and status.progress.best_step == 100
    # A pass without a fresh read keeps the list; the train result replaces it.
    view.checkpoints = None
    again, _ = compute_status(status, view, now="2025-01-01T00:02:00Z")
    assert [c.step for c in again.checkpoints] == [100, 200]
    view.train = result
    final, _ = compute_status(again, view, now="2025-01-01T00:03:00Z")
    assert [c.step for c in final.checkpoints] == [100, 200, 300]
    assert final.to_wire()["checkpoints"][1]["best"] is True


def test_validation_gauges_appear_with_the_first_validation_only() -> None:
    from kubetune_trainer.exporter import TrainMetrics

    metrics = TrainMetrics("job", "ns")

    def exported() -> set[str]:
        return {s.name for f in metrics.registry.collect() for s in f.samples}

    assert "kubetune_train_validation_loss" not in exported()  # no 0 that reads as a loss
    metrics.update_validation(2.5, best=2.4)
    assert {"kubetune_train_validation_loss", "kubetune_train_best_validation_loss"} <= exported()


# --------------------------------------------------------------------------- the CLI


def test_the_cli_has_evaluate_checkpoint_and_export() -> None:
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--job", "j.yaml", "--checkpoint", "200"])
    assert args.checkpoint == "200"
    assert parser.parse_args(["evaluate", "--job", "j.yaml"]).checkpoint is None
    args = parser.parse_args(
        ["export", "--job", "j.yaml", "--checkpoint", "200", "--to", "s3://m/x/"]
    )
    assert (args.checkpoint, args.to, args.output) == ("200", "s3://m/x/", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--job", "j.yaml", "--checkpoint", "200"])  # no --to
