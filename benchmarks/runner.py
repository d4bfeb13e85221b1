"""What every case shares: building and running the C side, statistics, the table, JSON and chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

C_SOURCE = Path(__file__).resolve().parent / "c" / "kvmbench.c"


@dataclass
class Series:
    """Repeated measurements of one quantity."""

    samples: list[float] = field(default_factory=list)

    def add(self, values: float | Iterable[float]) -> None:
        """Append one value or several."""
        if isinstance(values, (int, float)):
            self.samples.append(float(values))
        else:
            self.samples.extend(float(v) for v in values)

    @property
    def median(self) -> float | None:
        """The median, or None without samples."""
        return statistics.median(self.samples) if self.samples else None

    @property
    def low(self) -> float | None:
        """The smallest sample."""
        return min(self.samples) if self.samples else None

    @property
    def high(self) -> float | None:
        """The largest sample."""
        return max(self.samples) if self.samples else None


@dataclass
class Result:
    """One row: a quantity measured for kvmlib and (when there is one) for C."""

    name: str
    unit: str
    kvmlib: Series = field(default_factory=Series)
    c: Series | None = field(default_factory=Series)
    #: The target, as text: "<= 1.2" or ">= 10".
    target: str | None = None
    #: What the target applies to: "ratio" (kvmlib / C) or "kvmlib" (kvmlib's own median).
    target_of: str = "ratio"

    @property
    def ratio(self) -> float | None:
        """kvmlib's median over C's."""
        if self.c is None or self.c.median in (None, 0) or self.kvmlib.median is None:
            return None
        return self.kvmlib.median / self.c.median

    def met(self) -> bool | None:
        """Whether the target holds (None without a target or data)."""
        if self.target is None:
            return None
        op, value = self.target.split()
        measured = self.ratio if self.target_of == "ratio" else self.kvmlib.median
        if measured is None:
            return None
        return measured <= float(value) if op == "<=" else measured >= float(value)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of this case (medians, plus min/max and the target)."""
        c = self.c
        return {
            "name": self.name, "unit": self.unit, "kvmlib": self.kvmlib.median,
            "c": c.median if c is not None else None, "ratio": self.ratio,
            "kvmlib_min": self.kvmlib.low, "kvmlib_max": self.kvmlib.high,
            "c_min": c.low if c is not None else None, "c_max": c.high if c is not None else None,
            "samples": len(self.kvmlib.samples), "target": self.target,
            "target_of": self.target_of if self.target else None, "target_met": self.met(),
        }


def build_c(out_dir: Path) -> Path:
    """Compile the C baselines with ``-O2``; returns the executable."""
    exe = out_dir / "kvmbench"
    done = subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(C_SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"gcc failed to build the C baselines:\n{done.stderr}")
    return exe


def run_c(exe: Path, *args: str | os.PathLike[str]) -> dict[str, list[float]]:
    """Run the C side; returns its ``KEY value`` lines grouped by key."""
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"kvmbench {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return parse_c_output(done.stdout)


def parse_c_output(text: str) -> dict[str, list[float]]:
    """``KEY value`` lines -> ``{KEY: [values]}``; other lines are ignored."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isupper():
            try:
                value = float(parts[1])
            except ValueError:
                continue
            out.setdefault(parts[0], []).append(value)
    return out


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from kvmlib import Kvm
        with Kvm() as kvm:
            api = str(kvm.get_api_version())
    except Exception as e:  # describe the machine, never fail here
        api = f"unavailable ({e})"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "kernel": platform.release(),
            "python": platform.python_version(), "kvm_api": api,
            "gcc": subprocess.run(["gcc", "-dumpfullversion"], capture_output=True,
                                  text=True, check=False).stdout.strip()}


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    return f"{value:.3g}" if magnitude < 1000 else f"{value:,.0f}"


def _cell(series: Series | None) -> str:
    if series is None or series.median is None:
        return "n/a"
    return f"{_fmt(series.median)} ({_fmt(series.low)}-{_fmt(series.high)})"


def table(results: Sequence[Result]) -> str:
    """The results as a text table: medians with min-max, the ratio and the target."""
    header = ("case", "unit", "kvmlib median (min-max)", "C median (min-max)", "kvmlib/C", "target")
    rows = []
    for r in results:
        met = r.met()
        of = "" if r.target_of == "ratio" else " (kvmlib)"
        target = "" if r.target is None else f"{r.target}{of} {'met' if met else 'MISSED'}"
        rows.append((r.name, r.unit, _cell(r.kvmlib), _cell(r.c),
                     "n/a" if r.ratio is None else f"{r.ratio:.2f}", target))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[Result]) -> None:
    """One object per case: name, unit, kvmlib, c, ratio (medians), and the details."""
    path.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")


def write_png(path: Path, results: Sequence[Result], title: str) -> bool:
    """A bar chart of kvmlib / C per case (log scale), if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results if r.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.6))
    names = [f"{r.name} ({r.unit})" for r in rows]
    ratios = [r.ratio or 0.0 for r in rows]
    colors = ["#4c72b0" if r.met() in (None, True) else "#c44e52" for r in rows]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("kvmlib / C (median; 1 = as fast as raw ioctls in C; red: target missed)")
    for y, r in enumerate(rows):
        ax.annotate(f" {r.ratio:.2f}", (ratios[y], y), va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def progress(message: str) -> None:
    """A line on stderr, so stdout stays the table."""
    print(message, file=sys.stderr, flush=True)


Case = Callable[..., list[Result]]
