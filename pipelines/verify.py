"""Reread every artifact of a suite against the checksums written with it.

    python -m pipelines.verify [--suite default] [--root data] [--cheap] [--repair]

Exit status 0 when nothing is damaged, 1 when something is (each damaged file named), 2 for bad
input. `--repair` takes back the damaged artifacts' done-markers so the next `make run` redoes
exactly those from their inputs; `--cheap` checks presence and size only (what every reuse does).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis.paths import DataRoot
from analysis.stages.verify import verify_suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=os.environ.get("SPECTRA_SUITE", "default"),
                        help="suite name in pipelines/suites/ or a YAML path")
    parser.add_argument("--root", default=os.environ.get("SPECTRA_ROOT", "data"), help="data root")
    parser.add_argument("--cheap", action="store_true", help="presence and size only, no checksums")
    parser.add_argument("--repair", action="store_true", help="take back damaged artifacts' markers")
    args = parser.parse_args(argv)
    try:
        from pipelines.definitions import resolve_suite

        spec = resolve_suite(args.suite)
        root = Path(args.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist: pass the --root a suite ran under")
    except (ValueError, FileNotFoundError) as err:
        print(f"spectra: {err}", file=sys.stderr)
        return 2
    damage = verify_suite(spec, DataRoot(root, os.environ.get("SPECTRA_ACTIVATIONS_URL") or None),
                          full=not args.cheap, repair=args.repair)
    for d in damage:
        print(f"damaged: {d}")
    what = "checked sizes of" if args.cheap else "reread"
    if not damage:
        print(f"spectra: {what} every finished artifact of suite {spec.name!r} under {root}: all intact")
        return 0
    done = "markers taken back: `make run` redoes them" if args.repair else "rerun with --repair, then `make run`"
    print(f"spectra: {len(damage)} damaged file(s) in suite {spec.name!r} under {root}; {done}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
