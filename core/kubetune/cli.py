"""The ``kubetune`` command.

    kubetune run job.yaml                 # all stages on this machine (local mode)
    kubetune validate job.yaml            # check a manifest, list every problem
    kubetune validate job.yaml --check-uris   # ... and that its sources, model, output exist
    kubetune prepare  --job job.json --output s3://runs/x/g1   # one stage (what pods run)
    kubetune train    --job job.json --output ...
    kubetune evaluate --job job.json --output ... [--report] [--checkpoint STEP|URI]
    kubetune export   --job job.yaml --checkpoint STEP|URI --to s3://models/x/
    kubetune report   --job job.json --output ...
    kubetune crd [--check]                # regenerate crds/ from the schema
    kubetune operator                     # run the kopf operator (needs the [operator] extra)

Exit codes: 0 success, 1 stage failed (retriable), 2 bad usage or manifest,
3 stage failed in a way a retry cannot fix (bad dataset or spec).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kubetune import __version__
from kubetune.contract import (
    STAGE_ORDER,
    ExitCode,
    Stage,
    exit_code_for,
    write_termination_message,
)
from kubetune.schema import FineTuneJob, ManifestError, Reason, load_job


def _load(path: str) -> FineTuneJob:
    return load_job(Path(path))


def _trainer_missing(command: str, exc: ImportError) -> int:
    print(
        f"kubetune {command} needs the trainer extra (pip install 'kubetune[trainer]'): {exc}",
        file=sys.stderr,
    )
    return ExitCode.USAGE


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.local import run_local, summary_table
    except ImportError as exc:
        return _trainer_missing("run", exc)

    job = _load(args.manifest)
    stages = args.stages.split(",") if args.stages else list(STAGE_ORDER)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        print(
            f"kubetune run: unknown stage(s) {unknown}; use {','.join(STAGE_ORDER)}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    run = run_local(
        job,
        output=args.output,
        stages=stages,
        scratch=Path(args.scratch) if args.scratch else None,
        show_progress=not args.no_progress,
    )
    print(summary_table(run))
    if run.error is not None:
        print(f"kubetune run: stage {run.failed_stage} failed: {run.error}", file=sys.stderr)
        return exit_code_for(run.error)
    return ExitCode.OK


def _cmd_stage(args: argparse.Namespace) -> int:
    stage: str = args.command
    try:
        job = _load(args.job)
    except ManifestError as exc:
        write_termination_message(
            {"stage": stage, "error": str(exc), "reason": Reason.INVALID_SPEC.value}
        )
        raise
    try:
        from kubetune_trainer.stages import run_as_pod
    except ImportError as exc:
        return _trainer_missing(stage, exc)
    return run_as_pod(
        job,
        stage,
        output=args.output,
        scratch=Path(args.scratch) if args.scratch else None,
        with_report=bool(getattr(args, "report", False)),
        checkpoint=getattr(args, "checkpoint", None),
    )


def _cmd_export(args: argparse.Namespace) -> int:
    job = _load(args.job)
    try:
        from kubetune_trainer.stages import run_export
    except ImportError as exc:
        return _trainer_missing("export", exc)
    return run_export(
        job,
        args.checkpoint,
        args.to,
        output=args.output,
        scratch=Path(args.scratch) if args.scratch else None,
    )


def _cmd_promote(args: argparse.Namespace) -> int:
    job = _load(args.job)
    try:
        from kubetune_trainer.stages import run_promote
    except ImportError as exc:
        return _trainer_missing("promote", exc)
    return run_promote(job, output=args.output, force=args.force)


def _cmd_rollback(args: argparse.Namespace) -> int:
    job = _load(args.job) if args.job else None
    try:
        from kubetune_trainer.stages import run_rollback
    except ImportError as exc:
        return _trainer_missing("rollback", exc)
    target = args.target or (job.spec.promotion.target if job and job.spec.promotion else None)
    if not target:
        print("kubetune rollback: give --target, or --job with spec.promotion", file=sys.stderr)
        return ExitCode.USAGE
    return run_rollback(target, job=job)


def _cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args.manifest)
    if args.check_uris:
        from kubetune.preflight import check_uris

        problems = check_uris(job)
        if problems:
            print(
                f"{args.manifest}: {len(problems)} problem(s) with the URIs it names:",
                file=sys.stderr,
            )
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            return ExitCode.USAGE
    print(
        f"{args.manifest}: valid FineTuneJob {job.metadata.name!r} "
        f"(model {job.spec.model.display_name}, output {job.spec.storage.output})"
    )
    return ExitCode.OK


def _cmd_crd(args: argparse.Namespace) -> int:
    from kubetune import crd

    return crd.main(["--check"] if args.check else [])


def _cmd_operator(args: argparse.Namespace) -> int:
    try:
        from kubetune_operator.main import run as run_operator
    except ImportError as exc:
        print(
            f"kubetune operator needs the operator extra (pip install 'kubetune[operator]'): {exc}",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    return int(run_operator(args.operator_args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune and evaluate language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run all stages on this machine")
    run.add_argument("manifest", help="FineTuneJob YAML/JSON")
    run.add_argument("--output", help="override spec.storage.output")
    run.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGE_ORDER)}")
    run.add_argument("--scratch", help="working directory (default: a temp dir)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    for name in STAGE_ORDER:
        p = sub.add_parser(name, help=f"run the {name} stage (as a pod does)")
        p.add_argument("--job", required=True, help="FineTuneJob YAML/JSON (the resolved job)")
        p.add_argument("--output", help="output prefix of this run (default spec.storage.output)")
        p.add_argument("--scratch", help="working directory (default $KUBETUNE_SCRATCH or temp)")
        if name == Stage.EVALUATE:
            p.add_argument("--report", action="store_true", help="also write the report")
            p.add_argument(
                "--checkpoint",
                metavar="STEP|URI",
                help="score this training checkpoint instead of model/: a step listed in "
                "status.checkpoints / train/train.json, or a checkpoint URI "
                "(.../checkpoints/step-<8-digit step>); it is exported to <output>/exports/ first",
            )
        p.set_defaults(func=_cmd_stage)

    exp = sub.add_parser(
        "export",
        help="write a training checkpoint as a standalone model (save_pretrained + tokenizer)",
        description="Write a training checkpoint as a standalone model: save_pretrained "
        "weights (LoRA adapters merged), the dataset's tokenizer and kubetune-training.json, "
        "loadable with AutoModelForCausalLM.from_pretrained or usable as model.uri.",
    )
    exp.add_argument("--job", required=True, help="FineTuneJob YAML/JSON of the run")
    exp.add_argument("--output", help="output prefix of the run (default spec.storage.output)")
    exp.add_argument(
        "--checkpoint",
        required=True,
        metavar="STEP|URI",
        help="a step listed in status.checkpoints / train/train.json, or a checkpoint URI "
        "(.../checkpoints/step-<8-digit step>)",
    )
    exp.add_argument(
        "--to", required=True, metavar="URI", help="where to write the model (s3:// or file://)"
    )
    exp.add_argument("--scratch", help="working directory (default $KUBETUNE_SCRATCH or temp)")
    exp.set_defaults(func=_cmd_export)

    pro = sub.add_parser(
        "promote",
        help="promote the run's model to spec.promotion.target if it beats the baseline and "
        "the champion it was evaluated against",
    )
    pro.add_argument("--job", required=True, help="FineTuneJob YAML/JSON with spec.promotion")
    pro.add_argument("--output", help="output prefix of the run (default spec.storage.output)")
    pro.add_argument("--force", action="store_true", help="promote whatever the numbers say")
    pro.set_defaults(func=_cmd_promote)

    rb = sub.add_parser(
        "rollback", help="point the serving prefix's current.json back at the previous version"
    )
    rb.add_argument("--target", help="the promotion target (s3:// or file://)")
    rb.add_argument("--job", help="a FineTuneJob whose spec.promotion.target (and storage) to use")
    rb.set_defaults(func=_cmd_rollback)

    val = sub.add_parser("validate", help="check a manifest")
    val.add_argument("manifest")
    val.add_argument(
        "--check-uris",
        action="store_true",
        help="also check that dataset.source, model.uri/tokenizer exist and storage.output "
        "accepts writes (uses this machine's credentials)",
    )
    val.set_defaults(func=_cmd_validate)

    crd = sub.add_parser("crd", help="regenerate the CRD YAML from the schema")
    crd.add_argument("--check", action="store_true", help="fail if the files are stale")
    crd.set_defaults(func=_cmd_crd)

    op = sub.add_parser("operator", help="run the operator (kopf)")
    op.add_argument("operator_args", nargs=argparse.REMAINDER, help="passed to the operator")
    op.set_defaults(func=_cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ManifestError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.USAGE


if __name__ == "__main__":
    sys.exit(main())
