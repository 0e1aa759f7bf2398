"""The CPUs a stage keeps busy: the affinity capped by the pod's request and its cgroup's quota
(kubetune_trainer.cpus)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.contract import Env
from kubetune_trainer import cpus
from kubetune_trainer.cpus import cgroup_cpu_quota, fit_threads, usable_cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _proc(tmp_path: Path, text: str) -> Path:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(text + "\n")
    return proc


def test_v2_quota_in_the_processes_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000")
    _write(root / "kubepods" / "pod1" / "cpu.max", "50000 100000")
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "25000 100000")
    proc = _proc(tmp_path, "0::/kubepods/pod1/ctr")
    assert cgroup_cpu_quota(root, proc) == 0.25


def test_v2_inside_a_container_the_mount_root_is_its_own_cgroup(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "150000 100000")
    # A private cgroup namespace shows "/"; a shared one the host path, absent here.
    for path in ("/", "/kubepods/pod1/ctr"):
        assert cgroup_cpu_quota(root, _proc(tmp_path, f"0::{path}")) == 1.5


def test_v1_smallest_quota_on_the_way_down_and_minus_one_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    mount = root / "cpu,cpuacct"
    _write(mount / "cpu.cfs_quota_us", "-1")
    _write(mount / "cpu.cfs_period_us", "100000")
    _write(mount / "kubepods" / "cpu.cfs_quota_us", "400000")
    _write(mount / "kubepods" / "cpu.cfs_period_us", "100000")
    _write(mount / "kubepods" / "ctr" / "cpu.cfs_quota_us", "-1")
    _write(mount / "kubepods" / "ctr" / "cpu.cfs_period_us", "100000")
    proc = _proc(tmp_path, "12:memory:/kubepods/ctr\n4:cpu,cpuacct:/kubepods/ctr")
    assert cgroup_cpu_quota(root, proc) == 4.0


def test_no_quota_anywhere_or_no_cgroups_is_none(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(root, _proc(tmp_path, "0::/")) is None
    assert cgroup_cpu_quota(tmp_path / "absent", _proc(tmp_path, "0::/")) is None
    assert cgroup_cpu_quota(root, tmp_path / "no-such-proc-file") is None


@pytest.mark.parametrize(
    ("quota", "affinity", "requested", "expected"),
    [("25000 100000", 8, None, 1), ("150000 100000", 8, None, 1),
     ("200000 100000", 8, None, 2), ("800000 100000", 2, None, 2), ("max 100000", 4, None, 4),
     # Requests set no quota: without this cap two 250m pods on 2 cores run 4 threads.
     ("max 100000", 8, "1", 1), ("max 100000", 8, "3", 3), ("max 100000", 8, "16", 8),
     ("200000 100000", 8, "4", 2), ("max 100000", 8, "", 8), ("max 100000", 8, "two", 8)],
)  # fmt: skip
def test_usable_cpus_is_the_affinity_capped_by_the_request_and_the_quota_rounded_down(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    quota: str,
    affinity: int,
    requested: str | None,
    expected: int,
) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", quota)
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: affinity)
    if requested is None:
        monkeypatch.delenv(Env.CPUS, raising=False)
    else:
        monkeypatch.setenv(Env.CPUS, requested)
    assert usable_cpus(root, _proc(tmp_path, "0::/")) == expected


def test_fit_threads_sets_omp_threads_under_a_quota_and_leaves_a_users_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fit_threads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert fit_threads() is None
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_fit_threads_leaves_an_unlimited_process_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 4)
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fit_threads() is None
    assert "OMP_NUM_THREADS" not in os.environ


def test_torch_imported_before_takes_the_thread_count_too() -> None:
    # A fresh interpreter: torch's thread pool is per process.
    code = (
        "import torch; from kubetune_trainer import cpus as c\n"
        "c.affinity_cpus = lambda: 4; c.usable_cpus = lambda: 1\n"
        "c.fit_threads(); print(torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1"]
