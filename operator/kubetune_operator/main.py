"""Run the operator: ``kubetune operator`` or ``python -m kubetune_operator``.

    KUBECONFIG=~/.kube/config kubetune operator            # every namespace
    KUBETUNE_NAMESPACE=ml kubetune operator --verbose      # one namespace
    KUBETUNE_NAMESPACE=team-a,team-b kubetune operator     # these namespaces only

Settings come from the environment (see README.md next to this file); the flags only
override the log level. Liveness: ``http://0.0.0.0:$KUBETUNE_HEALTH_PORT/healthz``
(kopf's probe endpoint); metrics: ``:$KUBETUNE_OPERATOR_METRICS_PORT/metrics``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGINT/SIGTERM; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="kubetune operator",
        description="Run the FineTuneJob operator (settings: KUBETUNE_* environment variables).",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    args = parser.parse_args(list(argv) if argv is not None else None)

    import kopf

    from kubetune_operator import handlers  # noqa: F401 - registers the handlers
    from kubetune_operator.config import OperatorConfig

    try:
        cfg = OperatorConfig.from_env()
    except ValueError as exc:
        print(f"kubetune operator: {exc}", file=sys.stderr)
        return 2
    level = "DEBUG" if args.verbose else "WARNING" if args.quiet else cfg.log_level
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `kubetune` may have configured logging already; the level is ours to set.
    logging.getLogger().setLevel(getattr(logging, level, logging.INFO))
    # kopf's own chatter (one line per handled event) only at debug level.
    if level != "DEBUG":
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    liveness = f"http://0.0.0.0:{cfg.health_port}/healthz" if cfg.health_port else None
    kopf.run(
        standalone=True,
        # Exact names: with scanning disabled kopf watches each one and lists no namespaces.
        clusterwide=not cfg.namespaces,
        namespaces=list(cfg.namespaces),
        liveness_endpoint=liveness,
        memo=kopf.Memo(config=cfg),
    )
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
