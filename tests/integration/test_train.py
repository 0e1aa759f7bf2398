"""The train stage end to end on a tiny GPT-2 and real tldr text.

Run: ``python -m pytest tests/integration/test_train.py -q`` (CPU; the kill/resume
test starts one subprocess, which pays torch's import time once).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny
import torch
import yaml
from fixtures_s3 import free_port
from prometheus_client.parser import text_string_to_metric_families

from kubetune.contract import Env, ExitCode, StageError
from kubetune.layout import RunLayout
from kubetune.results import TrainResult
from kubetune.schema import FineTuneJob, Reason, TrainingSpec
from kubetune.storage import FileStorage, Storage, open_storage
from kubetune_trainer import checkpoints as ckpt
from kubetune_trainer.context import make_context
from kubetune_trainer.packing import build_rows
from kubetune_trainer.train import BatchSource, make_plan, resolve_precision, run

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread_no_metrics")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset (tldr lines, tiny BPE) under <dir>/dataset, copied into each run."""
    root = tmp_path_factory.mktemp("prepared")
    lines = tiny.tldr_lines(2200)
    tokenizer = tiny.train_tokenizer(lines[:2000])
    tiny.write_prepared(
        f"file://{root}",
        lines[:2000],
        lines[2000:],
        tokenizer,
        work=root.parent / f"{root.name}-work",
    )
    return root


def _output(dataset: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(dataset / "dataset", out / "dataset")
    return out


def _train(job: FineTuneJob, scratch: Path) -> TrainResult:
    return run(make_context(job, scratch=scratch))


def _losses(out: Path) -> list[float]:
    text = (out / RunLayout.TRAIN_METRICS).read_text()
    return [json.loads(line)["loss"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def finished(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """One 40-step run (checkpoints every 10, keep 2), shared by the tests that inspect it."""
    tmp = tmp_path_factory.mktemp("finished")
    out = _output(dataset, tmp)
    job = tiny.make_job(
        f"file://{out}",
        training={
            "maxSteps": 40,
            "checkpointEverySteps": 10,
            "keepCheckpoints": 2,
            "logEverySteps": 5,
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_METRICS_PORT", "0")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = _train(job, tmp / "scratch")
        finally:
            torch.set_num_threads(before)
    return out, result


# --------------------------------------------------------------------------- plan and data order


def test_total_steps_come_from_epochs_or_max_steps() -> None:
    spec = TrainingSpec(epochs=2, batch_size=4, gradient_accumulation_steps=3)
    plan = make_plan(rows=50, t=spec, num_processes=1)
    assert plan.micro_per_epoch == 13  # ceil(50 / 4)
    assert plan.total_steps == 9  # ceil(2 * 13 / 3)
    assert make_plan(50, spec, num_processes=2).micro_per_epoch == 7
    capped = TrainingSpec(epochs=2, batch_size=4, max_steps=100, warmup_ratio=0.1)
    assert make_plan(50, capped, 1).total_steps == 100
    assert make_plan(50, capped, 1).warmup_steps == 10


def test_processes_see_disjoint_shards_that_cover_every_block_each_epoch() -> None:
    rng = np.random.default_rng(0)
    lines = [rng.integers(1, 100, n).tolist() for n in rng.integers(3, 30, 200)]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines])])
    tokens = np.array([t for x in lines for t in x], dtype=np.uint32)
    rows = build_rows(tokens, offsets, block_size=32, eos_id=0)
    spec = TrainingSpec(batch_size=3, epochs=1)
    plan = make_plan(len(rows), spec, num_processes=2)
    sources = [BatchSource(rows, plan, rank, seed=5, pad_id=0) for rank in (0, 1)]
    seen: list[list[int]] = [[], []]
    for micro in range(plan.micro_per_epoch):
        for rank, source in enumerate(sources):
            idx = source.global_indices(micro)[rank * 3 : rank * 3 + 3]
            assert len(idx) == 3  # the last batch wraps around: both ranks step together
            seen[rank] += idx.tolist()
    first_pass = sorted(set(seen[0]) | set(seen[1]))
    assert first_pass == list(range(len(rows)))
    # Same seed -> same order (resume continues it); next epoch -> a new order.
    again = BatchSource(rows, plan, 0, seed=5, pad_id=0)
    assert again.global_indices(0).tolist() == sources[0].global_indices(0).tolist()
    assert again.global_indices(plan.micro_per_epoch).tolist() != again.global_indices(0).tolist()


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("fp16", cuda=False) == "no"
    assert "fp16 needs a GPU" in caplog.text
    assert resolve_precision("bf16", cuda=False) == "bf16"
    assert resolve_precision("fp32", cuda=False) == "no"


# --------------------------------------------------------------------------- one finished run


def test_loss_decreases_on_real_text(finished: tuple[Path, TrainResult]) -> None:
    out, result = finished
    losses = _losses(out)
    assert losses[0] > 5.5  # ~ln(512): the fresh model knows nothing
    assert losses[-1] < losses[0] - 0.7  # deterministic run: 6.27 -> 5.30 on this data
    assert result.steps == result.total_steps == 40
    assert result.final_loss == pytest.approx(losses[-1])
    assert result.train_tokens > 0 and result.tokens_per_second
    assert result.resumed_from_step is None
    assert result.config["modelConfig"]["n_layer"] == 2  # resolved config incl. model config
    saved = TrainResult.model_validate_json((out / RunLayout.TRAIN_RESULT).read_text())
    assert saved.steps == 40


def _run_store(output: Storage) -> Storage:
    """The checkpoints' storage of the only training run under ``output`` (training/<fp>)."""
    runs = {key.split("/")[1] for key in output.list(RunLayout.TRAINING_RUNS)}
    assert len(runs) <= 1, runs
    return output.sub(f"{RunLayout.TRAINING_RUNS}/{runs.pop() if runs else 'not-yet'}")


def test_checkpoints_at_interval_have_markers_and_old_ones_are_pruned(
    finished: tuple[Path, TrainResult],
) -> None:
    out, result = finished
    store = _run_store(FileStorage(f"file://{out}"))
    complete, incomplete = ckpt.list_checkpoints(store)
    assert complete == [30, 40] and incomplete == []  # every 10 steps, newest 2 kept
    for step in complete:
        key = RunLayout.checkpoint_key(step)
        marker = json.loads(store.read_text(f"{key}/{RunLayout.CHECKPOINT_MARKER}"))
        assert marker["step"] == step
        assert {"model.safetensors", "optimizer.bin", ckpt.STATE_FILE} <= set(marker["files"])
        state = ckpt.TrainerState.from_json(store.read_text(f"{key}/{ckpt.STATE_FILE}"))
        assert state.step == step and state.tokens_seen > 0
        assert state.config["training"]["learningRate"] == 3e-3  # resolved config, nanoGPT style
    assert result.last_checkpoint == store.uri(RunLayout.checkpoint_key(40))


def test_final_model_loads_standalone_with_its_tokenizer(
    finished: tuple[Path, TrainResult],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = finished
    model = AutoModelForCausalLM.from_pretrained(out / RunLayout.MODEL)
    tokenizer = AutoTokenizer.from_pretrained(out / RunLayout.MODEL)
    ids = tokenizer("list files in a directory", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    progress = json.loads((out / RunLayout.PROGRESS).read_text())
    assert progress["step"] == 40 and progress["percent"] == 100
    assert progress["updatedAt"].endswith("Z")


def test_same_seed_gives_the_same_final_loss(dataset: Path, tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        out = _output(dataset, tmp_path, name)
        job = tiny.make_job(
            f"file://{out}",
            training={"maxSteps": 8, "checkpointEverySteps": 100, "gradientAccumulationSteps": 2},
        )
        results.append(_train(job, tmp_path / f"scratch-{name}"))
    assert results[0].final_loss == results[1].final_loss
    assert results[0].steps == 8 and results[0].epochs > 0


# --------------------------------------------------------------------------- resume


_CHILD = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from kubetune.schema import load_job
from kubetune_trainer.context import make_context
from kubetune_trainer.train import run
run(make_context(load_job(sys.argv[1]), scratch=Path(sys.argv[2])))
"""


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}


def test_resume_after_sigkill_continues_from_the_last_complete_checkpoint(
    dataset: Path, tmp_path: Path
) -> None:
    out = _output(dataset, tmp_path)
    job = tiny.make_job(
        f"file://{out}",
        name="killed",
        training={
            "maxSteps": 60,
            "checkpointEverySteps": 10,
            "keepCheckpoints": 2,
            "logEverySteps": 2,
        },
    )
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.to_wire()))
    port = free_port()
    env = {
        **os.environ,
        "KUBETUNE_METRICS_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")]),
    }
    store = FileStorage(f"file://{out}")
    log_file = tmp_path / "child.log"
    with log_file.open("wb") as log_fh:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(job_file), str(tmp_path / "s1")],
            env=env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 400
        while not ckpt.list_checkpoints(_run_store(store))[0]:
            assert child.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        scraped = _scrape(port)  # the live trainer serves its metrics
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert scraped["kubetune_train_total_steps"] == 60
    assert "kubetune_train_tokens_total" in scraped and "kubetune_train_loss" in scraped
    complete, _ = ckpt.list_checkpoints(_run_store(store))
    assert complete and complete[-1] < 60
    killed_at = complete[-1]
    assert not (out / RunLayout.TRAIN_RESULT).exists()

    result = _train(job, tmp_path / "s2")  # a fresh pod: new scratch, same storage
    assert result.resumed_from_step == killed_at > 0
    assert result.steps == result.total_steps == 60
    assert (out / RunLayout.MODEL / "model.safetensors").exists()
    assert ckpt.list_checkpoints(_run_store(store)) == ([50, 60], [])
    lines = (out / RunLayout.TRAIN_METRICS).read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one line per logged step


def test_sigterm_saves_a_checkpoint_exits_interrupted_and_the_next_attempt_resumes(
    dataset: Path, tmp_path: Path
) -> None:
    """What a preempted training pod does in its grace period, through the stage CLI."""
    steps = 200
    training = {"maxSteps": steps, "checkpointEverySteps": 1000, "logEverySteps": 1}
    out = _output(dataset, tmp_path, "stopped")
    job = tiny.make_job(f"file://{out}", name="stopped", training=training)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job.to_wire()))
    termination = tmp_path / "termination-log"
    env = {
        **os.environ,
        Env.TERMINATION_LOG: str(termination),
        Env.SCRATCH: str(tmp_path / "s1"),
        Env.METRICS_PORT: "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")]),
    }
    store = FileStorage(f"file://{out}")
    log_file = tmp_path / "child.log"
    with log_file.open("wb") as log_fh:
        child = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "train", "--job", str(job_file)],
            env=env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 400
        while "kubetune_trainer.train: training " not in log_file.read_text():  # the plan
            assert child.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.02)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    log = log_file.read_text()
    assert child.returncode == ExitCode.INTERRUPTED, log[-3000:]
    message = json.loads(termination.read_text())
    assert message["reason"] == Reason.PREEMPTED.value and message["stage"] == "train"
    stopped_at = message["checkpointStep"]
    assert 1 <= stopped_at < steps, message  # mid-training, far from any interval checkpoint
    assert f"after step {stopped_at}" in message["error"] and "resumes" in message["error"]
    assert ckpt.list_checkpoints(_run_store(store))[0] == [stopped_at]  # complete, on its own
    assert not (out / RunLayout.TRAIN_RESULT).exists()
    # The stopped pod will be gone: progress.json is what tells the operator.
    assert json.loads((out / RunLayout.PROGRESS).read_text())["preemptions"] == 1

    resumed = _train(job, tmp_path / "s2")  # the next pod: new scratch, same storage
    assert resumed.resumed_from_step == stopped_at and resumed.preemptions == 1
    assert resumed.steps == steps
    whole_out = _output(dataset, tmp_path, "whole")
    whole = _train(
        tiny.make_job(f"file://{whole_out}", name="whole", training=training), tmp_path / "s3"
    )
    # The same data order, optimizer and RNG state from the checkpoint: the same model.
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5)
    a = _final_weights(out)
    b = _final_weights(whole_out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / RunLayout.MODEL / "model.safetensors")


def test_checkpoint_without_complete_marker_is_ignored_at_resume(
    dataset: Path, tmp_path: Path
) -> None:
    out = _output(dataset, tmp_path)
    job = tiny.make_job(f"file://{out}", training={"maxSteps": 20, "checkpointEverySteps": 10})
    _train(job, tmp_path / "s1")
    store = _run_store(FileStorage(f"file://{out}"))
    # Simulate a kill during the upload of step 20: its files are there but no marker
    # (and a torn weights file that must never be loaded).
    step20 = Path(store.root.removeprefix("file://")) / RunLayout.checkpoint_key(20)
    (step20 / RunLayout.CHECKPOINT_MARKER).unlink()
    (step20 / "model.safetensors").write_bytes(b"torn")
    (out / RunLayout.TRAIN_RESULT).unlink()
    assert ckpt.latest_complete(store) == (10, RunLayout.checkpoint_key(10))

    result = _train(job, tmp_path / "s2")
    assert result.resumed_from_step == 10
    assert result.steps == 20
    assert ckpt.list_checkpoints(store) == ([10, 20], [])
    assert (step20 / "model.safetensors").stat().st_size > 1000  # rewritten whole


def test_a_changed_setting_trains_afresh_in_its_own_run_and_says_why(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _output(dataset, tmp_path)
    first = _train(
        tiny.make_job(f"file://{out}", training={"maxSteps": 4, "checkpointEverySteps": 2}),
        tmp_path / "s1",
    )
    changed = tiny.make_job(
        f"file://{out}", training={"maxSteps": 4, "checkpointEverySteps": 2, "batchSize": 4}
    )
    with caplog.at_level(logging.INFO, logger="kubetune_trainer.train"):
        second = _train(changed, tmp_path / "s2")
    assert second.resumed_from_step is None and second.steps == 4  # not "done in 0 steps"
    assert second.training_fingerprint != first.training_fingerprint
    runs = FileStorage(f"file://{out}").list(RunLayout.TRAINING_RUNS)
    assert len({key.split("/")[1] for key in runs}) == 2  # the first run's checkpoints stay
    assert "training.batchSize: 8 -> 4" in caplog.text


# --------------------------------------------------------------------------- failures and options


def test_nan_loss_stops_with_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _output(dataset, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out / RunLayout.TOKENIZER)
    base = tiny.save_tiny_model(tmp_path / "base", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    model.save_pretrained(base)
    job = tiny.make_job(
        f"file://{out}",
        model={"uri": f"file://{base}"},
        training={"maxSteps": 5, "logEverySteps": 1},
    )
    with pytest.raises(
        StageError,
        match=r"training loss became nan at step 1; lower "
        r"training.learningRate",
    ) as err:
        _train(job, tmp_path / "scratch")
    assert err.value.reason == "StageFailed"
    assert not (out / RunLayout.TRAIN_RESULT).exists()
    assert FileStorage(f"file://{out}").list(RunLayout.TRAINING_RUNS) == []


def test_lora_trains_adapters_and_saves_a_merged_standalone_model(
    dataset: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _output(dataset, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out / RunLayout.TOKENIZER)
    base = tiny.save_tiny_model(tmp_path / "base", tokenizer)
    job = tiny.make_job(
        f"file://{out}",
        model={"uri": f"file://{base}"},
        training={"maxSteps": 6, "lora": {"r": 4, "alpha": 8}, "learningRate": 1e-2},
    )
    result = _train(job, tmp_path / "scratch")
    assert 0 < result.config["trainableParameters"] < result.config["parameters"] / 4
    merged = AutoModelForCausalLM.from_pretrained(out / RunLayout.MODEL)
    original = AutoModelForCausalLM.from_pretrained(base)
    assert not any("lora" in k for k in merged.state_dict())
    w_new = merged.transformer.h[0].attn.c_attn.weight
    w_old = original.transformer.h[0].attn.c_attn.weight
    assert not torch.equal(w_new, w_old)  # the adapters were merged into c_attn
    assert torch.equal(
        merged.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight
    )  # the rest stayed frozen


def test_bf16_without_packing_trains_on_cpu(dataset: Path, tmp_path: Path) -> None:
    out = _output(dataset, tmp_path)
    job = tiny.make_job(
        f"file://{out}",
        training={
            "maxSteps": 4,
            "precision": "bf16",
            "packing": False,
            "checkpointEverySteps": 100,
        },
    )
    result = _train(job, tmp_path / "scratch")
    assert result.config["mixedPrecision"] == "bf16"
    assert result.final_loss is not None and np.isfinite(result.final_loss)


def test_checkpoints_and_model_go_to_s3(dataset: Path, tmp_path: Path, s3_bucket: str) -> None:
    output = f"s3://{s3_bucket}/runs/tiny"
    store = open_storage(output)
    store.upload_dir(dataset / "dataset", RunLayout.DATASET)
    job = tiny.make_job(
        output, training={"maxSteps": 6, "checkpointEverySteps": 3, "keepCheckpoints": 1}
    )
    result = _train(job, tmp_path / "scratch")
    assert result.model_uri == f"{output}/model"
    assert ckpt.list_checkpoints(_run_store(store)) == ([6], [])
    assert store.exists("model/model.safetensors") and store.exists(RunLayout.TRAIN_RESULT)
    again: Any = _train(job, tmp_path / "scratch2")  # re-run: resumes at the end, same result
    assert again.resumed_from_step == 6 and again.steps == 6


def test_training_dropout_replaces_the_models_own_in_fresh_and_saved_models(
    tmp_path: Path,
) -> None:
    from torch import nn

    from kubetune.schema import ModelSpec
    from kubetune_trainer.modeling import load_model

    tok = tiny.train_tokenizer(tiny.tldr_lines(300))
    saved = tiny.save_tiny_model(tmp_path / "base", tok)  # GPT-2's default dropout, 0.1
    ctx = make_context(tiny.make_job(f"file://{tmp_path}/out"), scratch=tmp_path / "s")
    fresh = ModelSpec.model_validate({"fresh": {"nLayer": 1, "nHead": 2, "nEmbd": 32}})
    pretrained = ModelSpec.model_validate({"uri": f"file://{saved}"})
    for spec in (fresh, pretrained):
        kept = load_model(spec, ctx, len(tok))
        assert {m.p for m in kept.modules() if isinstance(m, nn.Dropout)} == {0.1}
        for p in (0.0, 0.25):
            model = load_model(spec, ctx, len(tok), dropout=p)
            assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {p}
            config = model.config
            assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == p


def test_loaded_models_run_the_fused_gelu_and_save_as_they_were_loaded(tmp_path: Path) -> None:
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from kubetune.schema import ModelSpec
    from kubetune_trainer.modeling import load_model, save_model

    tok = tiny.train_tokenizer(tiny.tldr_lines(300))
    saved = tiny.save_tiny_model(tmp_path / "base", tok)
    ctx = make_context(tiny.make_job(f"file://{tmp_path}/out"), scratch=tmp_path / "s")
    model = load_model(ModelSpec.model_validate({"uri": f"file://{saved}"}), ctx, len(tok))
    reference = AutoModelForCausalLM.from_pretrained(str(saved)).float()  # gelu_new as saved

    fused = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(fused) == model.config.n_layer and {m.approximate for m in fused} == {"tanh"}
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert any(isinstance(m, NewGELUActivation) for m in reference.modules())
    ids = torch.tensor([tok.encode("tar -xzf archive.tar.gz -C target/directory")])
    with torch.no_grad():
        got, want = model.eval()(ids).logits, reference.eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.equal(got, torch.zeros_like(got))

    # The swap holds no weights: the saved model is the loaded one, config included.
    save_model(model, tok, tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"))
    assert again.config.activation_function == reference.config.activation_function
    assert again.state_dict().keys() == reference.state_dict().keys()
