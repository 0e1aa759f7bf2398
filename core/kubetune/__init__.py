"""kubetune's core: what the operator and the trainer share, and nothing else.

* :mod:`kubetune.schema`: the FineTuneJob spec and status (the one source of truth);
  :mod:`kubetune.crd` generates ``crds/`` and the chart's CRD from it.
* :mod:`kubetune.contract`: the operator<->pod contract (stage names and their
  phases/conditions, environment variables, exit codes, ports, failure reasons).
* :mod:`kubetune.layout`: where each artifact of a run lives under its output prefix.
* :mod:`kubetune.dataset_format`: the prepared dataset's files, dtypes and invariants,
  with its writer and its checking reader.
* :mod:`kubetune.results`: the result file each stage writes.
* :mod:`kubetune.storage`: ``file://`` and ``s3://`` behind one interface, and the one
  S3 client factory.
* :mod:`kubetune.cli`: the ``kubetune`` command; it imports the trainer
  (``kubetune_trainer``) or the operator (``kubetune_operator``) only for the
  subcommands that need them.

Nothing here imports torch or kopf: the operator image installs this package
without torch, the trainer image without kopf. ``kubetune_trainer`` and
``kubetune_operator`` import this package and never each other
(``tests/unit/test_imports.py`` checks both).
"""

from __future__ import annotations

try:  # the installed distribution's version, also the default trainer image tag
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kubetune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
