"""kubetune's Kubernetes operator: FineTuneJob -> prepare, train and evaluate Jobs.

Run it with ``kubetune operator`` (or ``python -m kubetune_operator``); see
``operator/kubetune_operator/README.md`` for its settings. This module imports
nothing heavy, so ``import kubetune_operator`` works without kopf or the
Kubernetes client; the pure modules (:mod:`.builders`, :mod:`.status`,
:mod:`.observe`, :mod:`.rbac`) need neither either.

It imports the core package :mod:`kubetune` (schema, contract, layout, results,
storage) and never the trainer.
"""
