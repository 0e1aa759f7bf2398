"""Benchmark 5, workers: two CPU training processes vs one on the same global batch.

    python -m bench.run --quick --only workers

What ``resources.workers: 2`` with ``gpusPerWorker: 0`` runs in two pods, run here as two
processes on this machine: ``kubetune train`` with torch.distributed's environment (rank,
world size, a loopback rendezvous; gloo), each taking half of the global batch, against one
``kubetune train`` taking all of it. Both train the same prepared dataset (made once by the
real prepare stage) with the same model, steps, seed and ``training.dropout: 0``, one torch
thread per process (``KUBETUNE_CPUS=1``, what the operator sets for a pod that requests up to
one CPU), so the two-process run uses both cores and the one-process run one.

Figures: steady tokens/s of each (the trainer's own rate from step 1 to the last step,
``train/metrics.jsonl``) and their ratio. On two cores the ideal is 2x; gloo's all-reduce
of every gradient, run on the same cores, takes its share. The final losses are reported
too: the same global batch must train the same model (to float rounding).

The two processes run a third time without ``KUBETUNE_CPUS``, as two pods did before the
operator passed their CPU request: torch then starts a thread per core in each, four on two
cores. ``workers_fitted_vs_default_threads`` is the fitted run's rate over that one
(kubetune_trainer.cpus).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.assets import bench_tokenizer, scratch_root
from bench.common import Figure
from bench.train_bench import _steady_tokens_per_s, make_job
from kubetune.contract import Env

MODEL = {"nLayer": 2, "nHead": 4, "nEmbd": 128, "nPositions": 256}
GLOBAL_BATCH = 16
SEQ = 256
STEPS_QUICK, STEPS_FULL = 30, 120
DOCUMENTS = 600


def _job_file(workdir: Path, name: str, batch: int, steps: int, vocab: int) -> tuple[Path, Path]:
    out = workdir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    training = {
        "maxSteps": steps,
        "batchSize": batch,
        "maxSeqLength": SEQ,
        "dropout": 0.0,
        "logEverySteps": steps,  # one interval: step 1 to the last
        "checkpointEverySteps": 100_000,
    }
    job = make_job(f"file://{out}", training, DOCUMENTS, vocab, MODEL)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job.to_wire()))
    return path, out


def _train(job_file: Path, processes: int, scratch: Path, cpus: int | None = 1) -> None:
    """``kubetune train`` in ``processes`` processes joined by gloo on a loopback port, each
    told it has ``cpus`` CPUs as a pod is (None: as many threads as torch starts by itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = []
    for rank in range(processes):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", Env.CPUS)}
        env.update(KUBETUNE_METRICS_PORT="0", KUBETUNE_SCRATCH=str(scratch))
        if cpus is not None:
            env[Env.CPUS] = str(cpus)
        if processes > 1:
            env.update(
                ACCELERATE_USE_CPU="true",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(processes),
                LOCAL_WORLD_SIZE=str(processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "kubetune.cli", "train", "--job", str(job_file)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [(c.communicate()[1], c.returncode) for c in children]
    for stderr, code in errors:
        if code != 0:
            raise RuntimeError(f"kubetune train exited {code}: {stderr[-2000:]}")


def run(quick: bool, threads: int) -> tuple[list[Figure], dict[str, Any]]:
    from kubetune.results import TrainResult
    from kubetune.schema import load_job
    from kubetune_trainer import prepare
    from kubetune_trainer.context import make_context

    del threads  # one thread per process by design: the point is one core vs two
    steps = STEPS_QUICK if quick else STEPS_FULL
    from transformers import AutoTokenizer

    workdir = scratch_root() / "workers"
    vocab = len(AutoTokenizer.from_pretrained(str(bench_tokenizer())))
    one_file, one_out = _job_file(workdir, "one", GLOBAL_BATCH, steps, vocab)
    two_file, two_out = _job_file(workdir, "two", GLOBAL_BATCH // 2, steps, vocab)
    default_file, default_out = _job_file(workdir, "default", GLOBAL_BATCH // 2, steps, vocab)
    # One prepared dataset for all (prepare once, copy).
    prepare.run(make_context(load_job(one_file), scratch=workdir / "prep-scratch"))
    shutil.copytree(one_out / "dataset", two_out / "dataset")
    shutil.copytree(one_out / "dataset", default_out / "dataset")
    # One after the other; bench.run records the load before and after.
    _train(one_file, 1, workdir / "one-scratch")
    _train(two_file, 2, workdir / "two-scratch")
    _train(default_file, 2, workdir / "default-scratch", cpus=None)
    outs = {"one": one_out, "two": two_out, "default": default_out}
    results = {
        name: TrainResult.model_validate_json((out / "train" / "train.json").read_text())
        for name, out in outs.items()
    }
    rate = {
        name: _steady_tokens_per_s(out / "train" / "metrics.jsonl") for name, out in outs.items()
    }
    ratio = rate["two"] / rate["one"]
    one_loss, two_loss = results["one"].final_loss, results["two"].final_loss
    if one_loss is None or two_loss is None:
        raise RuntimeError("a training run recorded no final loss")
    loss_diff = abs(two_loss / one_loss - 1)
    shape = f"{MODEL['nLayer']}x{MODEL['nEmbd']}, global batch {GLOBAL_BATCH}x{SEQ}, {steps} steps"
    figures = [
        Figure("workers_1_tokens_per_s", round(rate["one"], 1), "tok/s", None, shape),
        Figure("workers_2_tokens_per_s", round(rate["two"], 1), "tok/s", None, "gloo, 2 processes"),
        Figure(
            "workers_2_vs_1_speedup",
            round(ratio, 3),
            "x",
            None,
            "ideal 2 on two cores; below 2 is gloo's all-reduce on the same cores",
        ),
        Figure(
            "workers_final_loss_rel_diff",
            loss_diff,
            "",
            "< 0.02",
            "same global batch; AdamW turns rounding into real differences (docs/distributed.md)",
        ),
        Figure(
            "workers_fitted_vs_default_threads",
            round(rate["two"] / rate["default"], 3),
            "x",
            ">= 1",
            "2 processes, 1 thread each vs torch's default (a thread per core) each; docs/cpus.md",
        ),
    ]
    info = {
        "steps": steps,
        "final_loss": {k: r.final_loss for k, r in results.items()},
        "num_processes": {k: r.config.get("numProcesses") for k, r in results.items()},
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return figures, info
