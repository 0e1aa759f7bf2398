"""Who holds an output prefix (kubetune_operator.outputs): pure functions, no cluster."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.outputs import (
    OutputClaim,
    normalise_output,
    output_holder,
    output_in_use_message,
    outputs_overlap,
)


def ftj(
    name: str, output: str, created: str, *, ns: str = "ml", uid: str = "", **meta: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": uid or f"uid-{name}",
            "creationTimestamp": created,
            **meta,
        },
        "spec": {"storage": {"output": output}},
    }


def claim(obj: dict[str, Any]) -> OutputClaim:
    found = OutputClaim.of(obj)
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("s3://b/p", "s3://b/p/"),
        ("s3://b/p", "S3://b//p/"),
        ("s3://b/p", "s3://b/p/./"),
        ("s3://b/p", "s3://b/p/team"),  # nested
        ("s3://b/p/team/", "s3://b/p"),  # nested, the other way round
        ("s3://b", "s3://b/p"),  # a whole bucket holds every prefix in it
        ("file:///data/runs", "file:///data/runs/x"),
    ],
)
def test_same_or_nested_prefixes_overlap(a: str, b: str) -> None:
    assert outputs_overlap(a, b) and outputs_overlap(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("s3://b/p", "s3://b/pp"),  # a longer name is not a nested prefix
        ("s3://b/p/x", "s3://b/p/y"),
        ("s3://b/p", "s3://c/p"),
        ("s3://b/p", "file://b/p"),
        ("file:///data/runs", "file://data/runs"),  # absolute vs relative to the pod
    ],
)
def test_sibling_and_foreign_prefixes_do_not_overlap(a: str, b: str) -> None:
    assert not outputs_overlap(a, b) and not outputs_overlap(b, a)


def test_normalised_output_ignores_trailing_and_doubled_slashes() -> None:
    assert (
        normalise_output("s3://b/p/") == normalise_output("s3://b//p") == ("s3", False, ("b", "p"))
    )


def test_the_older_job_holds_the_prefix_and_the_newer_one_is_refused() -> None:
    old = ftj("first", "s3://b/p/", "2025-01-01T00:00:00Z")
    new = ftj("second", "s3://b/p", "2025-01-01T00:00:05Z", ns="team-b")
    assert output_holder(claim(old), [old, new]) is None
    holder = output_holder(claim(new), [old, new])
    assert holder is not None and (holder.namespace, holder.name) == ("ml", "first")


def test_a_tie_in_creation_time_is_broken_by_uid() -> None:
    a = ftj("a", "s3://b/p", "2025-01-01T00:00:00Z", uid="0000-a")
    b = ftj("b", "s3://b/p", "2025-01-01T00:00:00Z", uid="ffff-b")
    assert output_holder(claim(a), [a, b]) is None
    assert output_holder(claim(b), [a, b]) == claim(a)


def test_the_oldest_of_several_holders_is_named() -> None:
    oldest = ftj("oldest", "s3://b/p/x", "2025-01-01T00:00:00Z")
    middle = ftj("middle", "s3://b/p", "2025-01-01T00:00:01Z")
    mine = ftj("mine", "s3://b/p", "2025-01-01T00:00:02Z")
    assert output_holder(claim(mine), [mine, middle, oldest]) == claim(oldest)


def test_jobs_being_deleted_or_without_output_or_elsewhere_hold_nothing() -> None:
    mine = ftj("mine", "s3://b/p", "2025-01-01T00:00:09Z")
    going = ftj("going", "s3://b/p", "2025-01-01T00:00:00Z", deletionTimestamp="2025-01-01T00:01Z")
    broken = {"metadata": {"name": "broken", "namespace": "ml", "uid": "u"}, "spec": {}}
    sibling = ftj("sibling", "s3://b/pp", "2025-01-01T00:00:00Z")
    assert output_holder(claim(mine), [mine, going, broken, sibling]) is None
    assert OutputClaim.of(going) is None and OutputClaim.of(broken) is None


def test_the_message_names_the_other_job_and_says_what_to_change() -> None:
    holder = claim(ftj("first", "s3://b/p/", "2025-01-01T00:00:00Z", ns="team-a"))
    same = output_in_use_message("s3://b/p", holder)
    assert "FineTuneJob team-a/first" in same and "the same prefix" in same
    assert "choose another storage.output" in same
    nested = output_in_use_message("s3://b/p/mine", holder)
    assert "overlapping" in nested and "s3://b/p/mine" in nested
