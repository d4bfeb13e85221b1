"""``python -m benchmarks``: kvmlib against raw ioctls in C, every case side by side in one run."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from kvmlib import Kvm

from .cases import CASES, Context, Settings, run_cases
from .runner import build_c, machine, progress, read_json, table, write_json, write_png


def main(argv: list[str] | None = None) -> int:
    """Build the C side, run the cases, print the table; optionally write JSON and a PNG chart."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="run every case briefly (under a minute in all)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write the results: one object per case (name, unit, kvmlib, c, ratio)")
    parser.add_argument("--png", type=Path, metavar="PATH",
                        help="draw the ratios as a bar chart (needs matplotlib: pip install "
                             "'.[plot]'); default benchmarks.png when matplotlib is installed")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these cases, from: {', '.join(CASES)}")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="run nothing: print the table of a saved run (--json) and, with --png, "
                             "redraw its chart")
    parser.add_argument("--title", help="the chart's title (default: this machine's description)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = read_json(args.from_json)
        print(table(saved))
        if args.png:
            if not write_png(args.png, saved, args.title or ""):
                parser.error("drawing the chart needs matplotlib: pip install '.[plot]'")
            progress(f"benchmarks: drew {args.png}")
        return 0
    names = list(CASES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    settings = Settings.quick() if args.quick else Settings()
    desc = machine()
    header = (f"{desc['cpu']}, {desc['cores']} cores, Linux {desc['kernel']}, Python {desc['python']}, "
              f"KVM API {desc['kvm_api']}, gcc {desc['gcc']}")
    print(f"machine: {header}")
    print(f"mode: {'quick' if args.quick else 'full'} ({settings.reps} repetitions, kvmlib and C "
          "interleaved)\n")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmlib-bench-") as tmp, Kvm() as kvm:
        exe = build_c(Path(tmp))
        results = run_cases(names, settings, Context(exe, Path(tmp), kvm))
    print(table(results))
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    if args.json:
        write_json(args.json, results)
        progress(f"benchmarks: wrote {args.json}")
    png = args.png or Path("benchmarks.png")
    if write_png(png, results, args.title or header):
        progress(f"benchmarks: drew {png}")
    elif args.png:
        progress("benchmarks: matplotlib is not installed, so no chart (pip install '.[plot]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
