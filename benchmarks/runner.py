"""What every case shares: building and running the C side, statistics, the table, JSON and chart."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    #: What the C column measures when it is not the same operation as kvmlib's, e.g. "memcpy of
    #: the whole 256 MiB" for fast reset; None when C does the same thing.
    baseline: str | None = None

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
            "baseline": self.baseline,
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


def _cell(median: float | None, low: float | None, high: float | None) -> str:
    if median is None:
        return "n/a"
    return f"{_fmt(median)} ({_fmt(low)}-{_fmt(high)})"


#: The columns of :func:`table` and :func:`table_rows`.
TABLE_HEADER = ("case", "unit", "kvmlib median (min-max)", "C median (min-max)", "kvmlib/C", "target")


def table_rows(cases: Sequence[Result | Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """One row of cells per case (a :class:`Result` or its JSON object), as :data:`TABLE_HEADER`."""
    rows: list[tuple[str, ...]] = []
    for case in map(_as_json, cases):
        of = "" if case.get("target_of") in (None, "ratio") else f" ({case['target_of']})"
        target = "" if case.get("target") is None else (
            f"{case['target']}{of} {'met' if case.get('target_met') else 'MISSED'}")
        ratio = case.get("ratio")
        rows.append((case["name"], case["unit"],
                     _cell(case.get("kvmlib"), case.get("kvmlib_min"), case.get("kvmlib_max")),
                     _cell(case.get("c"), case.get("c_min"), case.get("c_max")),
                     "n/a" if ratio is None else f"{ratio:.2f}", target))
    return rows


def table(results: Sequence[Result | Mapping[str, Any]]) -> str:
    """The results as a text table: medians with min-max, the ratio and the target."""
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in [TABLE_HEADER, *rows]) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [TABLE_HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, results: Sequence[Result]) -> None:
    """One object per case: name, unit, kvmlib, c, ratio (medians), and the details."""
    path.write_text(json.dumps([r.to_json() for r in results], indent=1) + "\n")


def read_json(path: Path) -> list[dict[str, Any]]:
    """The cases :func:`write_json` wrote."""
    cases = json.loads(path.read_text())
    if not isinstance(cases, list) or not all(isinstance(c, dict) and "name" in c for c in cases):
        raise ValueError(f"{path} is not a list of benchmark cases")
    return cases


def _as_json(case: Result | Mapping[str, Any]) -> Mapping[str, Any]:
    return case.to_json() if isinstance(case, Result) else case


def higher_is_better(unit: str) -> bool:
    """Whether a larger number is the better one: rates (units per second, ``MB/s``) are."""
    return unit.endswith("/s")


@dataclass(frozen=True)
class Panel:
    """One panel of the chart: the cases whose kvmlib / C ratios share a direction."""

    title: str
    xlabel: str
    higher_is_better: bool
    cases: list[Mapping[str, Any]]


def chart_panels(cases: Sequence[Result | Mapping[str, Any]]) -> tuple[list[Panel], list[str]]:
    """Split the cases with a C baseline by direction; also returns the names of those without.

    Times, sizes and other "lower is better" quantities go in one panel and rates ("higher is
    better") in another, so that a bar to the left of 1 always means the same thing within a panel.
    Each case is drawn against its own baseline: its ratio is kvmlib's median over its own C
    median, whatever that C side measures (the case's ``baseline`` says when it is not the same
    operation).
    """
    compared = [c for c in map(_as_json, cases) if c.get("ratio") is not None]
    alone = [c["name"] for c in map(_as_json, cases) if c.get("ratio") is None]
    panels = []
    lower = [c for c in compared if not higher_is_better(c["unit"])]
    higher = [c for c in compared if higher_is_better(c["unit"])]
    if lower:
        panels.append(Panel("Times and sizes: lower is better",
                            "kvmlib / C (median): below 1, kvmlib takes less than its C baseline",
                            False, lower))
    if higher:
        panels.append(Panel("Throughputs: higher is better",
                            "kvmlib / C (median): above 1, kvmlib moves more per second than its "
                            "C baseline", True, higher))
    return panels, alone


def _label(case: Mapping[str, Any]) -> str:
    label = f"{case['name']} ({case['unit']})"
    if case.get("baseline"):
        label += f"\nC baseline: {case['baseline']}"
    return label


def write_png(path: Path, results: Sequence[Result | Mapping[str, Any]], title: str) -> bool:
    """Draw kvmlib / C per case, one panel per direction (see :func:`chart_panels`).

    ``results`` are :class:`Result` objects or the JSON objects of a saved run (:func:`read_json`).
    Returns False, drawing nothing, when matplotlib (the ``plot`` extra) is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return False
    panels, alone = chart_panels(results)
    if not panels:
        return False
    # Laid out in inches, top down: the title, then per panel its heading, one slot per case (taller
    # where a label has a second line naming the baseline), its x axis; then the notes.
    width, left, right = 10.8, 4.2, 2.4
    slots = [0.5 if any(c.get("baseline") for c in p.cases) else 0.36 for p in panels]
    heading, axis, top = 0.35, 0.7, 0.45
    notes_height = 0.3 + 0.13 * (1 + len(", ".join(alone)) // int(width * 19))
    height = top + notes_height + sum(heading + slot * len(p.cases) + axis
                                      for slot, p in zip(slots, panels, strict=True))
    fig = plt.figure(figsize=(width, height))
    axes, y = [], height - top
    for slot, panel in zip(slots, panels, strict=True):
        y -= heading + slot * len(panel.cases)
        axes.append(fig.add_axes((left / width, y / height, (width - left - right) / width,
                                  slot * len(panel.cases) / height)))
        y -= axis
    for ax, panel in zip(axes, panels, strict=True):
        ratios = [float(c["ratio"]) for c in panel.cases]
        colors = ["#c44e52" if c.get("target_met") is False else "#4c72b0" for c in panel.cases]
        ax.barh(range(len(ratios)), ratios, color=colors, height=0.6, zorder=2)
        ax.set_yticks(range(len(ratios)), [_label(c) for c in panel.cases], fontsize=8.5)
        ax.set_ylim(len(ratios) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set_xlim(min([*ratios, 1.0]) / 1.5, max([*ratios, 1.0]) * 1.5)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.9, zorder=3)
        low, high = ax.get_xlim()
        ax.axvspan(1.0 if panel.higher_is_better else low, high if panel.higher_is_better else 1.0,
                   color="#55a868", alpha=0.10, zorder=0)
        for y, case in enumerate(panel.cases):
            ax.annotate(f"{case['ratio']:.2f}x   {_fmt(case['kvmlib'])} vs {_fmt(case['c'])} "
                        f"{case['unit']}", xy=(1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
        ax.annotate("kvmlib / C   kvmlib vs C", xy=(1.0, 1.0), xycoords="axes fraction",
                    xytext=(6, 4), textcoords="offset points", va="bottom", fontsize=8,
                    fontweight="bold")
        ax.set_title(panel.title, fontsize=10, loc="left", fontweight="bold")
        ax.set_xlabel(panel.xlabel, fontsize=8.5)
        ax.tick_params(axis="x", labelsize=8)
    notes = ["Shaded: the side where kvmlib does better than its baseline. Red: the case's target "
             "was missed. Medians; each case against its own C baseline."]
    if alone:
        notes.append(f"Without a C baseline, in the table only: {', '.join(alone)}.")
    fig.suptitle(title, fontsize=9, y=1 - 0.15 / height)
    # Wrapped to the figure's width (about 19 characters an inch at this size).
    wrapped = [line for note in notes for line in textwrap.wrap(note, int(width * 19))]
    fig.text(0.01, 0.1 / height, "\n".join(wrapped), fontsize=7.5, va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def progress(message: str) -> None:
    """A line on stderr, so stdout stays the table."""
    print(message, file=sys.stderr, flush=True)


Case = Callable[..., list[Result]]
