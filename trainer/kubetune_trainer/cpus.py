"""How many CPUs a stage should keep busy: its affinity, capped by its pod's CPU request and
by its cgroup's CPU quota.

    cpus = usable_cpus()           # e.g. 1 in a pod that requests 250m on a 2-core node
    fit_threads()                  # torch's (OpenMP's) threads to match, unless $OMP_NUM_THREADS

A pod sees every core of its node, so torch starts one OpenMP thread per core whatever the
pod asked for. Two training pods that request 250m each on a 2-core node then run four
spinning threads on two cores, and a pod with ``limits.cpu: 250m`` runs for 25 ms in every
100 ms while its threads wait on each other. Both are measured in docs/cpus.md (one thread
per requested CPU about halved each). So
every stage (pods, local mode, benchmarks) sizes its threads and worker processes from
:func:`usable_cpus`, as Go's automaxprocs and the JVM size theirs from the quota.

The request reaches the pod as ``$KUBETUNE_CPUS`` (``spec.resources.cpu`` rounded up, set
by the operator). Both cgroup versions are read for the quota: v2 ``cpu.max`` ("max
100000" or "25000 100000") and v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no
quota). A container usually sees its own cgroup at the mount's root; a process on a host
sees the whole tree, so the quota is the smallest found on the way from the mount's root
down to the process's own cgroup.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from kubetune.contract import Env

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# Set by the user (or a launcher such as torchrun): then it is theirs and we leave it.
THREADS_ENV = "OMP_NUM_THREADS"


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (all of them where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_quota(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """CPUs' worth of time the process's cgroups allow (0.25 for 250m); None without a quota."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = [q for q in (_quota_at(d) for d in _cgroup_dirs(root, lines)) if q is not None]
    return min(quotas) if quotas else None


def requested_cpus() -> int | None:
    """The pod's CPU request in whole CPUs (``$KUBETUNE_CPUS``); None outside a pod or unset."""
    value = os.environ.get(Env.CPUS, "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        log.warning("ignoring $%s=%r: not a whole number of CPUs", Env.CPUS, value)
        return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """Whole CPUs to keep busy: the affinity, capped by the request and by the quota rounded
    down (at least 1).

    The quota is rounded down because a thread that wants a whole CPU and gets half of one is
    throttled every period; 1.5 CPUs run one thread at full speed with room for the rest.
    """
    cpus = affinity_cpus()
    requested = requested_cpus()
    if requested is not None:
        cpus = min(cpus, requested)
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def fit_threads() -> int | None:
    """Size torch's (OpenMP's) threads to :func:`usable_cpus`; the count set, None if left.

    Leaves ``$OMP_NUM_THREADS`` alone when set. Before torch is imported the variable is
    enough (OpenMP reads it when it starts); after, torch is told directly.
    """
    if os.environ.get(THREADS_ENV):
        return None
    cpus, available = usable_cpus(), affinity_cpus()
    if cpus >= available:
        return None
    os.environ[THREADS_ENV] = str(cpus)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(cpus)
    log.info("torch threads: %d of %d CPUs (the pod's CPU request or quota)", cpus, available)
    return cpus


def _cgroup_dirs(root: Path, lines: list[str]) -> list[Path]:
    """The directories whose CPU quota applies to the process, existing ones only.

    ``lines`` is /proc/self/cgroup: ``0::/path`` (v2) or ``N:cpu,cpuacct:/path`` (v1).
    """
    dirs: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            mounts = [root]
        elif "cpu" in controllers.split(","):
            mounts = [root / "cpu,cpuacct", root / "cpu", root / "cpuacct,cpu"]
        else:
            continue
        for mount in mounts:
            if not mount.is_dir():
                continue
            dirs.append(mount)
            current = mount
            for part in Path(path).parts[1:]:
                current = current / part
                if current.is_dir():
                    dirs.append(current)
            break
    return dirs


def _quota_at(directory: Path) -> float | None:
    """The quota set on one cgroup directory, in CPUs; None when it sets none."""
    cpu_max = directory / "cpu.max"
    try:
        if cpu_max.exists():
            quota, _, period = cpu_max.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or 100000)
        quota_us = directory / "cpu.cfs_quota_us"
        if quota_us.exists():
            quota_value = int(quota_us.read_text().strip())
            if quota_value <= 0:
                return None
            return quota_value / int((directory / "cpu.cfs_period_us").read_text().strip())
    except (OSError, ValueError):
        return None
    return None
