"""Validation while training (training.validation), end to end on a tiny fresh GPT-2.

prepare carves the validation split from real tldr text (few documents, so a high learning
rate overfits within tens of steps: the validation loss has its minimum early), then:

* the validation loss is in metrics.jsonl, progress.json, the result and the log;
* keepBest saves the best step's weights as model/ (its validation loss, recomputed, is the
  best recorded), and the checkpoint list is keepCheckpoints newest + the best;
* earlyStoppingPatience 1 with a huge minDelta stops at the second validation, cleanly, and
  a rerun does not train on;
* a run that crashes after a checkpoint and resumes takes the same early-stopping decision
  as one that never stopped (best and patience come from the checkpoint);
* ``kubetune export`` and ``evaluate --checkpoint`` of a chosen checkpoint.

Run: ``python -m pytest tests/integration/test_validation.py -q`` (CPU, ~30 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
import yaml
from fixtures_s3 import free_port

from kubetune.layout import RunLayout
from kubetune.results import TrainingRecord, TrainResult
from kubetune.schema import FineTuneJob
from kubetune.storage import FileStorage, Storage
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer import train as train_module
from kubetune_trainer.context import make_context
from kubetune_trainer.prepare import run as prepare
from kubetune_trainer.validation import load_validation_rows, validation_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread_no_metrics")
REPO = Path(__file__).resolve().parents[2]

VALIDATION = {"fraction": 0.25, "everySteps": 5}
TRAINING = {
    "learningRate": 0.02,
    "warmupRatio": 0.0,
    "scheduler": "constant",
    "logEverySteps": 3,
    "checkpointEverySteps": 20,
    "keepCheckpoints": 1,
}


def _job(out: Path, name: str = "val", **training: Any) -> FineTuneJob:
    validation = {**VALIDATION, **training.pop("validation", {})}
    job = tiny.make_job(
        f"file://{out}",
        name=name,
        training={**TRAINING, **training, "validation": validation},
        evaluation={"baseline": False, "bleu": {"enabled": False}},
    )
    job.spec.dataset.max_documents = 8
    return job


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dataset/ with a validation split, prepared once (the spec's validation settings other
    than the fraction do not change it), copied into each run's output."""
    root = tmp_path_factory.mktemp("prepared")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_METRICS_PORT", "0")
        result = prepare(make_context(_job(root), scratch=root.parent / f"{root.name}-scratch"))
    assert (result.stats.validation_lines or 0) >= 10 and result.stats.train_lines >= 40
    return root


def _output(prepared: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(prepared / RunLayout.DATASET, out / RunLayout.DATASET)
    return out


def _train(job: FineTuneJob, scratch: Path) -> TrainResult:
    return train_module.run(make_context(job, scratch=scratch))


def _run_store(out: Path) -> Storage:
    store = FileStorage(f"file://{out}")
    (run,) = {k.split("/")[1] for k in store.list(RunLayout.TRAINING_RUNS)}
    return store.sub(f"{RunLayout.TRAINING_RUNS}/{run}")


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / RunLayout.TRAIN_METRICS).read_text().splitlines()]


def _validation_loss_of(model_dir: Path, job: FineTuneJob, scratch: Path) -> float:
    """The validation loss of a save_pretrained model, computed here from the split."""
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.bleu import context_token_id
    from kubetune_trainer.modeling import load_tokenizer

    ctx = make_context(job, scratch=scratch)
    tokenizer = load_tokenizer(ctx)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = load_validation_rows(
        ctx, tokenizer.eos_token_id, len(tokenizer), bos_id=context_token_id(tokenizer)
    )
    with torch.no_grad():
        nll, targets = validation_nll(
            model,
            rows,
            batch_size=8,
            pad_id=tokenizer.pad_token_id,
            device=torch.device("cpu"),
            attn_implementation=str(model.config._attn_implementation),
        )
    return nll / targets


# --------------------------------------------------------------------------- keepBest


@pytest.fixture(scope="module")
def best_run(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """40 steps, validation every 5, one checkpoint kept: the best is an early step."""
    tmp = tmp_path_factory.mktemp("best")
    out = _output(prepared, tmp, "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_METRICS_PORT", "0")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = _train(_job(out, maxSteps=40), tmp / "scratch")
        finally:
            torch.set_num_threads(before)
    return out, result


def test_validation_loss_is_in_metrics_progress_and_result(
    best_run: tuple[Path, TrainResult],
) -> None:
    out, result = best_run
    rows = _metrics(out)
    validated = {r["step"]: r["validation_loss"] for r in rows if "validation_loss" in r}
    assert sorted(validated) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all("loss" in r and "lr" in r for r in rows)  # the old fields, on every row
    assert result.validation_loss == pytest.approx(validated[40], abs=1e-6)
    best_step = min(validated, key=lambda s: validated[s])
    assert result.best_step == best_step < 40  # overfits: the minimum is early
    assert result.best_validation_loss == pytest.approx(validated[best_step], abs=1e-6)
    assert result.stopped_early is False and result.steps == 40
    progress = json.loads((out / RunLayout.PROGRESS).read_text())
    assert progress["validationLoss"] == pytest.approx(validated[40], abs=1e-6)
    assert progress["bestStep"] == best_step and progress["stoppedEarly"] is False
    assert progress["validationPerplexity"] == pytest.approx(
        torch.tensor(validated[40]).exp().item(), rel=1e-4
    )


def test_keep_best_saves_the_best_steps_weights_and_keeps_its_checkpoint(
    best_run: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    out, result = best_run
    assert result.best_step is not None and result.best_validation_loss is not None
    # model/ holds the best weights: their validation loss is the best one recorded.
    job = _job(out, maxSteps=40)
    model_loss = _validation_loss_of(out / RunLayout.MODEL, job, tmp_path / "s")
    assert model_loss == pytest.approx(result.best_validation_loss, abs=1e-5)
    assert result.model_step == result.best_step
    record = TrainingRecord.model_validate_json((out / RunLayout.MODEL_RECORD).read_text())
    assert record.model_step == result.best_step and record.steps == 40
    assert record.validation_loss == pytest.approx(result.best_validation_loss, abs=1e-6)
    # Checkpoints: keepCheckpoints (1) newest + the best, oldest first, in the result and
    # progress.json alike.
    store = _run_store(out)
    assert ckpt.list_checkpoints(store) == ([result.best_step, 40], [])
    listed = [(c.step, c.best) for c in result.checkpoints]
    assert listed == [(result.best_step, True), (40, False)]
    assert result.checkpoints[0].validation_loss == pytest.approx(result.best_validation_loss)
    assert result.checkpoints[0].uri == store.uri(RunLayout.checkpoint_key(result.best_step))
    assert result.checkpoints[1].loss == pytest.approx(result.final_loss, abs=1e-5)
    progress = json.loads((out / RunLayout.PROGRESS).read_text())
    assert [c["step"] for c in progress["checkpoints"]] == [result.best_step, 40]


# --------------------------------------------------------------------------- early stopping


def test_patience_one_and_a_big_min_delta_stop_at_the_second_validation(
    prepared: Path, tmp_path: Path
) -> None:
    out = _output(prepared, tmp_path, "stop")
    job = _job(out, maxSteps=40, validation={"earlyStoppingPatience": 1, "minDelta": 100.0})
    result = _train(job, tmp_path / "s1")
    assert result.stopped_early and result.steps == 10 and result.total_steps == 40
    assert result.best_step in (5, 10) and result.validation_loss is not None
    # Stopped cleanly: a checkpoint at the stop step, the model, the result.
    assert ckpt.list_checkpoints(_run_store(out))[0][-1] == 10
    assert result.last_checkpoint is not None and result.last_checkpoint.endswith("step-00000010")
    assert (out / RunLayout.MODEL / "model.safetensors").exists()
    progress = json.loads((out / RunLayout.PROGRESS).read_text())
    assert progress["stoppedEarly"] is True and progress["percent"] == 100
    assert progress["step"] == 10
    state = ckpt.TrainerState.from_json(
        _run_store(out).read_text(f"{RunLayout.checkpoint_key(10)}/{ckpt.STATE_FILE}")
    )
    assert state.stopped_early and state.validation["bad"] == 1
    # A rerun into the same output resumes where it stopped and does not train on.
    again = _train(job, tmp_path / "s2")
    assert again.resumed_from_step == 10 and again.steps == 10 and again.stopped_early
    assert again.best_step == result.best_step


def test_a_resumed_run_takes_the_same_early_stopping_decision(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    training = {
        "maxSteps": 60,
        "checkpointEverySteps": 5,
        "keepCheckpoints": 2,
        "validation": {"earlyStoppingPatience": 3},
    }
    reference = _train(_job(_output(prepared, tmp_path, "ref"), **training), tmp_path / "s0")
    assert reference.stopped_early and reference.best_step is not None
    assert reference.steps == reference.best_step + 15  # three validations without a drop
    crash_at = reference.best_step + 5  # one bad validation counted in the checkpoint

    out = _output(prepared, tmp_path, "crash")
    job = _job(out, **training)
    original = train_module._Trainer._after_step

    def after_step(self: Any, setup: Any, state: Any, *args: Any) -> None:
        original(self, setup, state, *args)
        if state.step == crash_at:
            raise RuntimeError("simulated crash after the checkpoint")

    monkeypatch.setattr(train_module._Trainer, "_after_step", after_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(job, tmp_path / "s1")
    state = ckpt.TrainerState.from_json(
        _run_store(out).read_text(f"{RunLayout.checkpoint_key(crash_at)}/{ckpt.STATE_FILE}")
    )
    assert state.validation["best_step"] == reference.best_step and state.validation["bad"] == 1
    monkeypatch.setattr(train_module._Trainer, "_after_step", original)

    resumed = _train(job, tmp_path / "s2")
    assert resumed.resumed_from_step == crash_at
    assert (resumed.steps, resumed.best_step) == (reference.steps, reference.best_step)
    assert resumed.stopped_early
    assert resumed.best_validation_loss == pytest.approx(reference.best_validation_loss, abs=1e-5)
    assert resumed.model_step == reference.best_step


# --------------------------------------------------------------------------- a chosen checkpoint


def test_export_a_checkpoint_by_step_and_by_uri(
    best_run: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.cli import main

    out, result = best_run
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(_job(out, maxSteps=40).to_wire()))
    by_step = tmp_path / "by-step"
    code = main(
        ["export", "--job", str(job_file), "--checkpoint", "40", "--to", f"file://{by_step}"]
    )
    assert code == 0
    AutoTokenizer.from_pretrained(by_step)  # the dataset's tokenizer came along
    AutoModelForCausalLM.from_pretrained(by_step)
    loss = _validation_loss_of(by_step, _job(out, maxSteps=40), tmp_path / "s")
    assert loss == pytest.approx(result.validation_loss, abs=1e-5)  # step 40's weights
    record = TrainingRecord.model_validate_json((by_step / "kubetune-training.json").read_text())
    assert record.model_step == 40 and record.training_fingerprint == result.training_fingerprint

    best = result.checkpoints[0]
    by_uri = tmp_path / "by-uri"
    code = main(
        ["export", "--job", str(job_file), "--checkpoint", best.uri, "--to", f"file://{by_uri}"]
    )
    assert code == 0
    loss = _validation_loss_of(by_uri, _job(out, maxSteps=40), tmp_path / "s2")
    assert loss == pytest.approx(best.validation_loss, abs=1e-5)

    # A step with no checkpoint is refused, naming the ones there are (exit 3).
    assert (
        main(
            ["export", "--job", str(job_file), "--checkpoint", "7", "--to", f"file://{tmp_path}/x"]
        )
        == 3
    )


def test_evaluate_a_chosen_checkpoint(best_run: tuple[Path, TrainResult], tmp_path: Path) -> None:
    from kubetune.results import EvaluateResult
    from kubetune_trainer.evaluate import eval_keys
    from kubetune_trainer.export import export_key
    from kubetune_trainer.stages import run_as_pod

    out, result = best_run
    job = _job(out, maxSteps=40)
    assert run_as_pod(job, "evaluate", scratch=tmp_path / "s") == 0
    own = (out / RunLayout.EVAL_RESULT).read_text()
    scores = {None: EvaluateResult.model_validate_json(own).fine_tuned.perplexity}
    assert result.best_step is not None
    for step in (result.best_step, 40):
        assert run_as_pod(job, "evaluate", scratch=tmp_path / "s", checkpoint=str(step)) == 0
        key, _ = eval_keys(export_key(step))
        scored = EvaluateResult.model_validate_json((out / key).read_text())
        scores[step] = scored.fine_tuned.perplexity
    # model/ is the best checkpoint's weights (keepBest); step 40 is another model.
    assert scores[result.best_step] == pytest.approx(scores[None], rel=1e-6)
    assert scores[40] != pytest.approx(scores[None], rel=1e-3)
    # Scoring checkpoints by hand never replaces the run's own evaluation.
    assert (out / RunLayout.EVAL_RESULT).read_text() == own


# --------------------------------------------------------------------------- two processes

_PROCESS = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from kubetune.schema import load_job
from kubetune_trainer.context import make_context
from kubetune_trainer.train import run
run(make_context(load_job(sys.argv[1]), scratch=Path(sys.argv[2])))
"""


def _launch_two(job: FineTuneJob, workdir: Path) -> None:
    """Two trainer processes joined by gloo, as ``accelerate launch --cpu`` starts them."""
    job_file = workdir / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.to_wire()))
    port = free_port()
    children = []
    for rank in range(2):
        env = {
            **os.environ,
            "ACCELERATE_USE_CPU": "true",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "KUBETUNE_METRICS_PORT": "0",
            "PYTHONPATH": os.pathsep.join(
                [str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")]
            ),
        }
        log_file = workdir / f"rank{rank}.log"
        with log_file.open("wb") as log_fh:
            child = subprocess.Popen(
                [sys.executable, "-c", _PROCESS, str(job_file), str(workdir / "scratch")],
                env=env,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
            )
        children.append((child, log_file))
    try:
        for child, log_file in children:
            child.wait(timeout=300)
            assert child.returncode == 0, log_file.read_text()[-3000:]
    finally:
        for child, _ in children:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.mark.slow
def test_two_processes_score_the_validation_loss_of_one(prepared: Path, tmp_path: Path) -> None:
    """Each process scores its shard (rows r::2); the summed loss is the one
    a single process gets, with the same weights (no dropout: the same global batch gives
    the same step)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(prepared / RunLayout.TOKENIZER)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=tiny.N_POSITIONS,
        vocab_size=len(tokenizer),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(tiny.SEED)
    base = tmp_path / "base"
    GPT2LMHeadModel(config).save_pretrained(str(base))

    def job(name: str, batch_size: int) -> tuple[Path, FineTuneJob]:
        out = _output(prepared, tmp_path, name)
        j = _job(
            out,
            name=name,
            maxSteps=2,  # full global batches (an epoch's last one wraps with 2 processes)
            batchSize=batch_size,
            packing=False,  # a row per line (or chunk): shards of different targets
            validation={"everySteps": 1, "maxSamples": 15},
        )
        j.spec.model = j.spec.model.model_validate({"uri": f"file://{base}"})
        return out, j

    one_out, one_job = job("one", 8)
    two_out, two_job = job("two", 4)
    _train(one_job, tmp_path / "s1")
    (tmp_path / "w").mkdir()
    _launch_two(two_job, tmp_path / "w")
    one = [r["validation_loss"] for r in _metrics(one_out)]
    two = [r["validation_loss"] for r in _metrics(two_out)]
    assert len(one) == len(two) == 2
    assert two == pytest.approx(one, rel=1e-5)
    result = TrainResult.model_validate_json((two_out / RunLayout.TRAIN_RESULT).read_text())
    assert result.config["numProcesses"] == 2 and result.config["validationRows"] >= 15
