"""API paths built from names: each name is one percent-encoded segment, never a traversal."""

from __future__ import annotations

import posixpath

import pytest

from kubetune_operator.kube import all_ftjs_path, core_path, ftj_path, jobs_path, path_for

TRAVERSALS = [
    "../../kube-system/secrets/admin",
    "../x",
    "a/b",
    "x?watch=true",
    "x#frag",
    "x%2F..",
    "name with spaces",
]


def test_plain_names_give_the_usual_paths() -> None:
    assert ftj_path("ml") == "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs"
    assert ftj_path("ml", "tldr") == "/apis/kubetune.io/v1alpha1/namespaces/ml/finetunejobs/tldr"
    assert all_ftjs_path() == "/apis/kubetune.io/v1alpha1/finetunejobs"
    assert jobs_path("ml", "tldr-g1-train") == "/apis/batch/v1/namespaces/ml/jobs/tldr-g1-train"
    assert core_path("ml", "secrets", "s3.creds") == "/api/v1/namespaces/ml/secrets/s3.creds"
    assert core_path("ml", "configmaps") == "/api/v1/namespaces/ml/configmaps"


@pytest.mark.parametrize("name", TRAVERSALS)
def test_a_name_is_one_segment_that_cannot_leave_its_collection(name: str) -> None:
    for collection, path in [
        (ftj_path("ml"), ftj_path("ml", name)),
        (jobs_path("ml"), jobs_path("ml", name)),
        (core_path("ml", "secrets"), core_path("ml", "secrets", name)),
    ]:
        parent, segment = path.rsplit("/", 1)
        assert parent == collection
        assert "/" not in segment and "?" not in segment and "#" not in segment
        assert " " not in segment
        # Even a client or server that normalises dot segments stays in the collection.
        assert posixpath.normpath(path) == path


@pytest.mark.parametrize("namespace", TRAVERSALS)
def test_a_namespace_is_one_segment_too(namespace: str) -> None:
    paths = [ftj_path(namespace, "x"), jobs_path(namespace, "x"), core_path(namespace, "s", "x")]
    for path in paths:
        _, rest = path.split("/namespaces/", 1)
        _, *tail = rest.split("/")
        assert len(tail) == 2 and tail[-1] == "x", path
        assert posixpath.normpath(path) == path


def test_percent_signs_are_encoded_so_a_server_cannot_decode_a_slash() -> None:
    assert core_path("ml", "secrets", "x%2F..").endswith("/secrets/x%252F..")


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_a_segment_that_would_name_the_collection_or_its_parent_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes object name"):
        core_path("ml", "secrets", bad) if bad else core_path(bad, "secrets")
    if bad:
        with pytest.raises(ValueError):
            jobs_path("ml", bad)
        with pytest.raises(ValueError):
            ftj_path(bad)


def test_path_for_a_built_object_encodes_its_namespace() -> None:
    job = {"kind": "Job", "metadata": {"namespace": "ml/../other"}}
    assert path_for(job) == "/apis/batch/v1/namespaces/ml%2F..%2Fother/jobs"
