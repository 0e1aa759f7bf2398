"""kubetune's Kubernetes operator: FineTuneJob -> prepare, train and evaluate Jobs.

Run it with ``kubetune operator`` (or ``python -m kubetune_operator``); see
``operator/kubetune_operator/README.md`` for its settings. This module imports
nothing heavy, so ``import kubetune_operator`` works without kopf or the
Kubernetes client; the pure modules (:mod:`.builders`, :mod:`.status`,
:mod:`.observe`, :mod:`.rbac`) need neither either.
"""

from __future__ import annotations

try:  # the installed distribution's version, also the default trainer image tag
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kubetune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["__version__"]
