"""What a containerd node leaves on the host, found and removed; ContainerdNode.stop uses `sweep`.

    leftovers(scope) -> list[str]   one line per thing still there; [] means the host is clean
    sweep(scope) -> list[str]       remove all of it (processes first, then mounts, cgroups,
                                    network), and return what it had to remove

Stopping the kubelet and containerd is not enough: containerd's shims and the containers under
them run on (the shims are started in their own process groups on purpose), each sandbox leaves
a network namespace bind-mounted under the state dir, each container an overlay and an shm
mount, the kubelet its tmpfs volumes and a bind mount of its own root dir, and the pods' cgroups
stay in every cgroup v1 hierarchy. Everything is found by where it is, never by name pattern
alone: processes by the node's cgroup root or by a marker (the state dir) in their command
line, mounts under the state dir, cgroups under the node's cgroup root, and the node's own
bridge and iptables chain. Another node or cluster on the same host is never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_MOUNT = Path("/sys/fs/cgroup")
SHIM_SOCKET_DIR = Path("/run/containerd/s")  # fixed in containerd for root; see containerd_node
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # fixed in the kubelet


@dataclass(frozen=True)
class NodeScope:
    """Where one node's things are: every path the node makes is under `state_dir`."""

    state_dir: Path
    cgroup_root: str  # the kubelet's cgroupRoot, e.g. "/kubetune-containerd-node"
    bridge: str  # the CNI bridge the harness made, e.g. "kt-cni0"
    nat_chain: str  # the harness's DNAT chain in the nat table
    markers: tuple[str, ...]  # strings that only the node's own processes have in argv
    # More dirs whose mounts are the node's: containerd's temporary unpack mounts in the
    # image store it holds (left there only if containerd died in the middle of an unpack).
    mount_dirs: tuple[Path, ...] = ()


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


# -- processes -----------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def node_processes(scope: NodeScope) -> dict[int, str]:
    """pid -> command line of every live process of the node (zombies are already gone)."""
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        stat = _read(entry / "stat")
        if not stat or stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        cmdline = _read(entry / "cmdline").replace("\0", " ").strip()
        cgroups = _read(entry / "cgroup")
        in_cgroup = any(
            line.split(":", 2)[-1].startswith(scope.cgroup_root + "/")
            or line.split(":", 2)[-1] == scope.cgroup_root
            for line in cgroups.splitlines()
        )
        if in_cgroup or any(marker in cmdline for marker in scope.markers):
            found[int(entry.name)] = cmdline or f"[{_read(entry / 'comm').strip()}]"
    return found


def kill_node_processes(scope: NodeScope, timeout: float = 10.0) -> list[str]:
    """SIGKILL the node's processes until none is left (containers may fork while dying)."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        alive = node_processes(scope)
        if not alive:
            break
        for pid, cmdline in alive.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed[pid] = cmdline
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return [f"process {pid}: {cmdline}" for pid, cmdline in killed.items()]


# -- mounts --------------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest (and most recent) first."""
    prefix = str(root).rstrip("/")
    points = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> list[str]:
    removed = []
    for _ in range(5):  # a bind mount of the kubelet dir can hide mounts stacked under it
        points = mounts_under(root)
        if not points:
            break
        for point in points:
            if _run("umount", point).returncode != 0:
                _run("umount", "--lazy", point)
            removed.append(f"mount {point}")
    return removed


# -- cgroups -------------------------------------------------------------------------------


def node_cgroups(scope: NodeScope) -> list[Path]:
    """The node's cgroup directories in every hierarchy, children before parents."""
    found: list[Path] = []
    for hierarchy in sorted(CGROUP_MOUNT.iterdir()) if CGROUP_MOUNT.is_dir() else []:
        top = hierarchy / scope.cgroup_root.lstrip("/")
        if not top.is_dir() or top.is_symlink():
            continue
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            found.append(Path(dirpath))
    return found


def remove_cgroups(scope: NodeScope) -> list[str]:
    removed = []
    for cgroup in node_cgroups(scope):
        with contextlib.suppress(FileNotFoundError):
            try:
                cgroup.rmdir()
                removed.append(f"cgroup {cgroup}")
            except OSError as err:
                removed.append(f"cgroup {cgroup} (could not remove: {err.strerror})")
    return removed


# -- network -------------------------------------------------------------------------------


def bridge_exists(name: str) -> bool:
    return bool(name) and Path("/sys/class/net", name).exists()


def bridge_ports(name: str) -> list[str]:
    brif = Path("/sys/class/net", name, "brif")
    return sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []


def iptables_lines(scope: NodeScope) -> list[str]:
    """Rules and chains in any table that name the node's bridge or chain."""
    lines: list[str] = []
    if not scope.bridge or not scope.nat_chain:  # the node never got as far as its network
        return lines
    for table in ("nat", "filter", "mangle", "raw"):
        result = _run("iptables", "-w", "-t", table, "-S")
        for line in result.stdout.splitlines():
            if f" {scope.bridge} " in f" {line} " or scope.nat_chain in line:
                lines.append(f"iptables -t {table}: {line}")
    return lines


def remove_nat_chain(scope: NodeScope) -> list[str]:
    removed: list[str] = []
    if not scope.nat_chain:
        return removed
    for line in iptables_lines(scope):
        table, rule = line.removeprefix("iptables -t ").split(": ", 1)
        if rule.startswith("-A "):  # a jump into our chain (or a rule of it): delete by spec
            _run("iptables", "-w", "-t", table, "-D", *rule.split()[1:])
            removed.append(line)
    for table in ("nat",):
        if _run("iptables", "-w", "-t", table, "-F", scope.nat_chain).returncode == 0:
            _run("iptables", "-w", "-t", table, "-X", scope.nat_chain)
            removed.append(f"iptables -t {table} chain {scope.nat_chain}")
    return removed


def remove_bridge(name: str) -> list[str]:
    removed = []
    for port in bridge_ports(name):  # veths of sandboxes whose netns outlived the runtime
        _run("ip", "link", "del", port)
        removed.append(f"veth {port}")
    if bridge_exists(name):
        _run("ip", "link", "del", name)
        removed.append(f"bridge {name}")
    return removed


def kube_proxy_lines() -> list[str]:
    """kube-proxy's KUBE-* chains and rules (IPv4 and IPv6; host-wide names)."""
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in _run(tool).stdout.splitlines():
            if "KUBE-" in line:
                lines.append(f"{tool}: {line}")
    return lines


def remove_kube_proxy_rules(kube_proxy: Path, config: Path) -> list[str]:
    """`kube-proxy --cleanup`, plus the KUBE-FIREWALL chain it leaves on purpose (it was the
    kubelet's once, and kube-proxy does not delete what a kubelet may still use)."""
    before = kube_proxy_lines()
    if not before:
        return []
    _run(str(kube_proxy), "--cleanup", f"--config={config}")
    for tool in ("iptables", "ip6tables"):
        for hook in ("INPUT", "OUTPUT"):
            while _run(tool, "-w", "-D", hook, "-j", "KUBE-FIREWALL").returncode == 0:
                pass
        _run(tool, "-w", "-F", "KUBE-FIREWALL")
        _run(tool, "-w", "-X", "KUBE-FIREWALL")
    return [f"kube-proxy rules ({len(before)} lines)"]


# -- files outside the state dir -------------------------------------------------------------


def log_links(scope: NodeScope) -> list[Path]:
    """The kubelet's /var/log/containers symlinks that point into this node's state dir."""
    if not CONTAINER_LOG_LINKS.is_dir():
        return []
    prefix = str(scope.state_dir) + "/"
    return [
        link
        for link in CONTAINER_LOG_LINKS.iterdir()
        if link.is_symlink() and os.readlink(link).startswith(prefix)
    ]


def remove_files_outside(scope: NodeScope) -> list[str]:
    removed = []
    for link in log_links(scope):
        link.unlink(missing_ok=True)
        removed.append(f"log link {link}")
    # Only when empty: another runtime on the host may use them.
    for directory in (CONTAINER_LOG_LINKS, SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent):
        with contextlib.suppress(OSError):
            directory.rmdir()
    return removed


# -- all together --------------------------------------------------------------------------


def leftovers(scope: NodeScope) -> list[str]:
    """Everything of the node still on the host, one line each (the state dir's files aside)."""
    found = [f"process {pid}: {cmd}" for pid, cmd in node_processes(scope).items()]
    for directory in (scope.state_dir, *scope.mount_dirs):
        found += [f"mount {point}" for point in mounts_under(directory)]
    found += [f"cgroup {path}" for path in node_cgroups(scope)]
    if bridge_exists(scope.bridge):
        found.append(f"bridge {scope.bridge} (ports: {', '.join(bridge_ports(scope.bridge))})")
    found += iptables_lines(scope)
    found += [f"log link {link}" for link in log_links(scope)]
    return found


def sweep(scope: NodeScope) -> list[str]:
    """Remove everything `leftovers` would report; processes first, as they pin the rest."""
    removed = kill_node_processes(scope)
    for directory in (scope.state_dir, *scope.mount_dirs):
        removed += unmount_all(directory)
    removed += remove_cgroups(scope)
    removed += remove_nat_chain(scope)
    removed += remove_bridge(scope.bridge)
    removed += remove_files_outside(scope)
    return removed
