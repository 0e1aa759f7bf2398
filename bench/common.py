"""Shared helpers of the benchmarks: figures, the machine record, the table and the JSON file.

Every benchmark returns a list of :class:`Figure` (one named number per line item, with
its unit, target and a note). :func:`write_results` stores them with the machine they
were measured on; :func:`format_table` prints them. Pure functions, unit-tested in
``tests/unit/test_bench_common.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TLDR_PAGES = SHARED_DATA / "tldr-pages" / "pages"


@dataclass
class Figure:
    """One measured (or not measured) number.

    ``target`` is a string such as ``">= 10"`` or ``"< 2048"``; :func:`target_met` reads it.
    ``value`` is None when the figure could not be measured; ``note`` then says why.
    """

    name: str
    value: float | None
    unit: str = ""
    target: str | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return target_met(self.value, self.target)


def target_met(value: float | None, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 10"``, ``"< 1"``); None if either is missing."""
    if value is None or target is None:
        return None
    op, _, number = target.strip().partition(" ")
    bound = float(number)
    checks = {
        ">=": value >= bound,
        ">": value > bound,
        "<=": value <= bound,
        "<": value < bound,
    }
    if op not in checks:
        raise ValueError(f"target {target!r}: expected '<op> <number>' with op in {sorted(checks)}")
    return checks[op]


def not_measured(names: list[tuple[str, str, str | None]], reason: str) -> list[Figure]:
    """Figures (name, unit, target) that could not be measured, all with the same reason."""
    return [
        Figure(name, None, unit, target, f"not measured: {reason}") for name, unit, target in names
    ]


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The checked-out commit, with ``-dirty`` when the work tree has changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What the figures were measured on (the load average matters on a shared machine)."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = threads if threads is not None else torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    for mod in ("transformers", "accelerate", "tokenizers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def results_document(
    figures: list[Figure], machine: dict[str, Any], mode: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON document: ``figures`` maps name -> {value, unit, target, met, note}."""
    doc: dict[str, Any] = {
        "mode": mode,
        "machine": machine,
        "figures": {
            f.name: {**{k: v for k, v in asdict(f).items() if k != "name"}, "met": f.met}
            for f in figures
        },
    }
    if extra:
        doc["details"] = extra
    return doc


def write_results(doc: dict[str, Any], path: Path) -> Path:
    """Write ``doc`` as indented JSON atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def format_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2e}"


def format_table(figures: list[Figure]) -> str:
    """A Markdown table: figure | value | unit | target | met | note."""
    rows = [("figure", "value", "unit", "target", "met", "note")]
    for f in figures:
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        rows.append((f.name, format_value(f.value), f.unit, f.target or "", met, f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
