"""`cai-ray run` (the pipeline) and `cai-ray stage` (one stage)."""

from __future__ import annotations

import argparse

from cai_ray.cli.options import add_set_option
from cai_ray.layout import STAGES


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the pipeline on a config (default: the local tiny run)")
    run.add_argument("config", nargs="?", default="configs/local-tiny.yaml")
    add_set_option(run)
    run.add_argument("--until", choices=STAGES, help="stop after this stage")
    run.add_argument(
        "--preview", action="store_true", help="first run the quick generate+label preview"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--serve", action="store_true", help="then serve the run's models over HTTP")
    run.set_defaults(func=_run)

    stage = sub.add_parser("stage", help="run (or resume) one pipeline stage")
    stage.add_argument("stage", choices=STAGES)
    stage.add_argument("config", nargs="?", default="configs/local-tiny.yaml")
    add_set_option(stage)
    stage.add_argument("--no-progress", action="store_true", help="no progress bars")
    stage.set_defaults(func=_stage)


def _load(args: argparse.Namespace):
    from cai_ray.config import load_config, resolve_path

    return load_config(resolve_path(args.config), args.overrides)


def _run(args: argparse.Namespace) -> int:
    from cai_ray.pipeline.runner import run_pipeline

    cfg = _load(args)
    if args.preview:
        from cai_ray.pipeline.preview import run_preview

        run_preview(cfg)
    run_pipeline(cfg, until=args.until, progress=not args.no_progress)
    _report_and_next_steps(cfg, args)
    if args.serve:
        from cai_ray.cli.serve import serve_and_wait

        return serve_and_wait(cfg)
    return 0


def _report_and_next_steps(cfg, args: argparse.Namespace) -> None:
    """The run's HTML report, then where it is and what to run next (a new user's questions)."""
    from pathlib import Path

    from cai_ray.report import build_report

    try:
        report = build_report(cfg.run_dir)
    except Exception as err:  # the run's outputs are written; a report failure must not hide them
        print(
            f"\nreport: not written ({type(err).__name__}: {err}); retry: cai-ray report {cfg.run_dir}"
        )
        report = None
    config = args.config + "".join(f" --set {o}" for o in args.overrides)
    print()
    if report is not None:
        print(f"report: {Path(report).resolve()} (open it in a browser)")
    print("next:")
    print(f"  cai-ray serve {config}    # the policy, PM and constitution over HTTP")
    print(f"  cai-ray stage evaluate {config}    # rerun stage 7 after changing evaluate.*")
    print(f"  cai-ray report {cfg.run_dir}    # rebuild the report")


def _stage(args: argparse.Namespace) -> int:
    from cai_ray.pipeline.runner import run_stage

    run_stage(args.stage, _load(args), progress=not args.no_progress)
    return 0
