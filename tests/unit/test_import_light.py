"""`import cai_ray` stays light: the core never pulls in ray, vllm or deepspeed (STYLE.md)."""

import subprocess
import sys

HEAVY = ("ray", "vllm", "deepspeed", "torch", "transformers")
CORE_MODULES = (
    "cai_ray",
    "cai_ray.config",
    "cai_ray.errors",
    "cai_ray.cli",
    "cai_ray.constitution",
    "cai_ray.data.conversation",
    "cai_ray.data.sources",
    "cai_ray.sl.critique",
    "cai_ray.feedback.prompts",
    "cai_ray.engines",
    "cai_ray.engines.base",
)


def test_import_cai_ray_imports_no_heavy_packages():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_MODULES)
        + f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"heavy modules imported by the core: {out.stdout}"


def test_cli_help_is_fast_and_light():
    code = (
        "import sys, contextlib, io\n"
        "from cai_ray.cli import build_parser\n"
        "build_parser()\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""
