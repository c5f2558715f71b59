"""`cai-ray report RUN_DIR [-o OUT.html]`: the run's report as one self-contained HTML page."""

from __future__ import annotations

import argparse

from cai_ray.errors import CaiRayError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="write an HTML report (plots, manifests, traces)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    parser.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html)")
    parser.add_argument("--sample", type=int, default=20, help="traces of each kind to show")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from cai_ray.report import build_report

    if args.sample < 0:
        raise CaiRayError("--sample must be 0 or more", where="--sample")
    path = build_report(args.run_dir, out=args.output, sample=args.sample)
    print(f"wrote {path} (plots in {args.run_dir}/report/)")
    return 0
