"""Which FineTuneJob an output prefix belongs to: pure functions over listed FineTuneJobs.

Two live FineTuneJobs must not share ``spec.storage.output``, nor have one nested in the
other (``s3://b/p`` and ``s3://b/p/team``): each would see the other's runs under
``runs/``. The older one (by ``creationTimestamp``, then ``uid``) keeps the prefix; the
reconciler refuses to start Jobs for the newer one until the older one is deleted or
moves::

    holder = output_holder(OutputClaim.of(body), kube.list(all_ftjs_path()))
    if holder is not None:
        reason, message = Reason.OUTPUT_IN_USE.value, output_in_use_message(job_output, holder)

Prefixes are compared after normalising: the scheme's case, empty and ``.`` path segments
(trailing or doubled slashes) do not matter. ``spec.storage.endpoint`` is not compared
(one cluster, one bucket namespace is the safe assumption). Tested in
``tests/unit/test_outputs.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def normalise_output(uri: str) -> tuple[str, bool, tuple[str, ...]]:
    """``(scheme, absolute, segments)`` of a storage URI.

    ``s3://b/p/`` and ``s3://b//p`` -> ``("s3", False, ("b", "p"))``; ``absolute`` tells
    ``file:///data`` from ``file://data`` (relative to the pod's directory).
    """
    scheme, sep, rest = uri.strip().partition("://")
    if not sep:
        scheme, rest = "", uri.strip()
    segments = tuple(s for s in rest.split("/") if s not in ("", "."))
    return scheme.lower(), rest.startswith("/"), segments


def outputs_overlap(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same prefix or one lies inside the other."""
    scheme_a, abs_a, seg_a = normalise_output(a)
    scheme_b, abs_b, seg_b = normalise_output(b)
    if (scheme_a, abs_a) != (scheme_b, abs_b):
        return False
    n = min(len(seg_a), len(seg_b))
    return seg_a[:n] == seg_b[:n]


@dataclass(frozen=True)
class OutputClaim:
    """A live FineTuneJob's claim on its ``spec.storage.output``."""

    namespace: str
    name: str
    uid: str
    created: str  # metadata.creationTimestamp (RFC 3339, UTC: sorts as text)
    output: str

    @property
    def age_key(self) -> tuple[str, str]:
        """Older first: creationTimestamp, then uid (a tie within one second)."""
        return self.created, self.uid

    @classmethod
    def of(cls, obj: Obj) -> OutputClaim | None:
        """The claim of a listed FineTuneJob; None when it is being deleted or has no output."""
        meta = obj.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        storage = ((obj.get("spec") or {}).get("storage")) or {}
        output = storage.get("output")
        if not isinstance(output, str) or not output.strip():
            return None
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            created=str(meta.get("creationTimestamp") or ""),
            output=output,
        )


def output_holder(mine: OutputClaim, others: Iterable[Obj]) -> OutputClaim | None:
    """The oldest live FineTuneJob older than ``mine`` whose output overlaps ``mine``'s.

    None when the prefix is free for ``mine``. ``others`` may include ``mine`` itself
    (matched by uid) and FineTuneJobs being deleted (they hold nothing any more).
    """
    holders = [
        claim
        for claim in (OutputClaim.of(obj) for obj in others)
        if claim is not None
        and claim.uid != mine.uid
        and claim.age_key < mine.age_key
        and outputs_overlap(claim.output, mine.output)
    ]
    return min(holders, key=lambda c: c.age_key) if holders else None


def output_in_use_message(output: str, holder: OutputClaim) -> str:
    """What the user reads in the Stalled condition of the refused FineTuneJob."""
    same = normalise_output(output) == normalise_output(holder.output)
    how = "the same prefix as" if same else "a prefix overlapping"
    return (
        f"spec.storage.output {output} is {how} the output {holder.output} of FineTuneJob "
        f"{holder.namespace}/{holder.name}, which is older; two FineTuneJobs must not share "
        "an output prefix (nor nest one in the other): choose another storage.output, or "
        f"delete {holder.namespace}/{holder.name} first"
    )
