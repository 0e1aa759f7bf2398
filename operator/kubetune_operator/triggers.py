"""Retraining triggers: pure pieces (names, run ids, times, the dataset comparison).

A FineTuneJob's run is ``g<generation>`` when a spec change started it and
``g<generation>-r<n>`` for the n-th retrain of that spec (:func:`kubetune.layout.run_id`).
The reconciler
(:meth:`kubetune_operator.reconcile.Reconciler._retrain`) checks the triggers only when the
current run has finished (Succeeded or Failed) and ``spec.suspend`` is not true:

* :attr:`Trigger.MANUAL`: the FineTuneJob's annotation :data:`ANNOTATION_RETRAIN` differs from
  the value recorded on the current run's ConfigMap;
* :attr:`Trigger.SCHEDULE`: ``spec.retrain.schedule`` (:mod:`kubetune_operator.cron`) has a time
  after the current run's start that is not in the future;
* :attr:`Trigger.DATASET_CHANGED`: ``spec.retrain.onDatasetChange`` and the source's listing
  (keys, sizes, ETags) differs from the ``sourceFiles`` the current run's prepare recorded
  (:func:`source_changed`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

# Set by users (kubectl annotate ftj x kubetune.io/retrain=$(date +%s) --overwrite): a new
# value asks for one more run of the current spec once the current run has finished.
ANNOTATION_RETRAIN = "kubetune.io/retrain"

# The condition that says whether the triggers of spec.retrain can work, and its reasons.
RETRAIN_CONDITION = "Retrain"
REASON_ARMED = "Armed"  # True: the triggers are checked once the current run has finished
REASON_SUSPENDED = "Suspended"  # False: spec.suspend stops them
REASON_INVALID_SPEC = "InvalidSpec"  # False: spec.retrain.schedule does not parse
REASON_NOT_POLLABLE = "SourceNotPollable"  # False: the operator cannot list this source
REASON_SOURCE_UNREADABLE = "SourceUnreadable"  # False: listing failed; retried next poll
REASON_NO_LISTING = "NoSourceListing"  # False: the run's prepare recorded no listing


class Trigger(str, enum.Enum):
    """Why a run started (``status.trigger``, ``status.history[].trigger``, Event reasons)."""

    SPEC_CHANGE = "SpecChange"
    SCHEDULE = "Schedule"
    DATASET_CHANGED = "DatasetChanged"
    MANUAL = "Manual"


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC, to the second, as the rest of the status."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    """An RFC 3339 time of the status or of metadata (UTC); None if absent or unreadable."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


Listing = list[tuple[str, int, str]]


def normalize_listing(entries: Iterable[Sequence[Any]]) -> Listing:
    """``(key, size, version)`` triples, sorted: a storage listing or a recorded one."""
    out = []
    for entry in entries:
        key, size, version = entry[0], entry[1], entry[2]
        out.append((str(key), int(size), str(version)))
    return sorted(out)


def recorded_listing(fingerprint_inputs: dict[str, Any] | None) -> Listing | None:
    """The source listing prepare recorded (``fingerprintInputs.sourceFiles``), or None."""
    if not fingerprint_inputs:
        return None
    files = fingerprint_inputs.get("sourceFiles")
    if not isinstance(files, list) or not files:
        return None
    try:
        return normalize_listing(files)
    except (IndexError, TypeError, ValueError):
        return None


def listing_changes(recorded: Listing, current: Listing) -> str:
    """What changed between two listings, for the Event: ``"2 added, 1 modified"``; "" if same."""
    before = {key: (size, version) for key, size, version in recorded}
    after = {key: (size, version) for key, size, version in current}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    modified = sum(1 for key in before.keys() & after.keys() if before[key] != after[key])
    parts = [
        f"{count} {what}"
        for count, what in ((added, "added"), (removed, "removed"), (modified, "modified"))
        if count
    ]
    return ", ".join(parts)
