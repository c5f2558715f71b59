"""`cai-ray constitution validate|show|import|diff`: check, read, import and compare constitutions."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from cai_ray.errors import ConstitutionError

_WIDTH = 100


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `constitution` command and its sub-commands."""
    parser = sub.add_parser(
        "constitution",
        help="validate, show, import or diff constitution files",
        description="Work with constitution YAML files (see constitutions/default.yaml).",
    )
    cmds = parser.add_subparsers(dest="constitution_command", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("validate", help="check a constitution; print counts and its hash")
    p.add_argument("file", help="constitution YAML file")
    p.set_defaults(func=_validate)

    p = cmds.add_parser("show", help="list a constitution's principles and examples")
    p.add_argument("file", help="constitution YAML file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--examples", action="store_true", help="also print the few-shot transcripts")
    p.set_defaults(func=_show)

    p = cmds.add_parser("import", help="convert Anthropic's or Hugging Face's format to YAML")
    p.add_argument("src", help="Anthropic prompts/ directory, or a Hugging Face JSON file")
    p.add_argument("-o", "--output", required=True, help="YAML file to write")
    p.add_argument("--format", choices=("anthropic", "hf"), help="skip format detection")
    p.add_argument("--name", help="name for the imported constitution")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=_import)

    p = cmds.add_parser("diff", help="compare two constitutions (exit 0 same, 1 different)")
    p.add_argument("a", help="first constitution YAML file")
    p.add_argument("b", help="second constitution YAML file")
    p.set_defaults(func=_diff)


def _summary(c) -> str:
    n = c.counts()
    return (
        f"{n['critique_principles']} critique/revision principles, "
        f"{n['feedback_principles']} feedback principles; few-shot: "
        f"{n['critique_examples']} critique/revision, {n['feedback_examples']} feedback, "
        f"{n['cot_examples']} chain-of-thought; hash {c.content_hash}"
    )


def _validate(args: argparse.Namespace) -> int:
    from cai_ray.constitution import load_constitution

    c = load_constitution(args.file)
    print(f"OK {args.file}: {c.name} v{c.version}")
    print(f"  {_summary(c)}")
    return 0


def _wrap(text: str, indent: str, hang: str = "") -> str:
    """`text` wrapped to the terminal width; continuation lines indented by `hang` more."""
    lines = []
    for para in text.splitlines() or [""]:
        wrapped = textwrap.fill(
            para, _WIDTH, initial_indent=indent, subsequent_indent=indent + hang
        )
        lines.append(wrapped or indent)
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    from cai_ray.constitution import load_constitution

    c = load_constitution(args.file)
    if args.json:
        data = {"path": str(args.file), "content_hash": c.content_hash, "counts": c.counts()}
        data |= c.model_dump(mode="json", exclude_none=True)
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    print(f"{c.name} v{c.version}  (hash {c.short_hash})")
    print(_wrap(c.description, "  "))
    if c.source:
        print(f"  source: {c.source}")
    print(f"\nCritique/revision principles ({len(c.critique_principles)}):")
    for p in c.critique_principles:
        print(f"  [{p.id}]")
        print(_wrap(f"critique: {p.critique}", "    ", "  "))
        print(_wrap(f"revision: {p.revision}", "    ", "  "))
    print(f"\nFeedback principles ({len(c.feedback_principles)}):")
    for p in c.feedback_principles:
        print(_wrap(f"[{p.id}] {p.question}", "  ", "  "))
    n = c.counts()
    rounds = sum(len(e.rounds) for e in c.critique_examples)
    print(
        f"\nFew-shot examples: {n['critique_examples']} critique/revision "
        f"({rounds} round{'' if rounds == 1 else 's'}), "
        f"{n['feedback_examples']} feedback, {n['cot_examples']} chain-of-thought"
    )
    if args.examples:
        _print_examples(c)
    return 0


def _print_examples(c) -> None:
    # Examples without a principle take one sampled at use time; show them with the first.
    question = c.feedback_principles[0].question if c.feedback_principles else "[principle]"
    for title, examples in (
        ("critique/revision", c.critique_examples),
        ("feedback", c.feedback_examples),
        ("chain-of-thought", c.cot_examples),
    ):
        for i, example in enumerate(examples):
            label = example.id or str(i)
            print(f"\n--- {title} example {label} ---")
            if title == "critique/revision":
                print(example.as_transcript().lstrip("\n"))
            else:
                own = example.principle or example.question
                print(example.as_transcript(question=None if own else question).lstrip("\n"))


def _import(args: argparse.Namespace) -> int:
    from cai_ray.constitution import dump_constitution, load_constitution
    from cai_ray.constitution.importers import import_constitution

    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConstitutionError(
            "output file exists", where=str(out), hint="pass --force to overwrite it"
        )
    c = import_constitution(args.src, fmt=args.format, name=args.name)
    header = (
        f"Imported by `cai-ray constitution import` from {args.src}.\n"
        "Check it with `cai-ray constitution validate`; edit freely (the hash follows the content)."
    )
    dump_constitution(c, out, header=header)
    written = load_constitution(out)  # prove the file we wrote is one our loader accepts
    if written.content_hash != c.content_hash:
        raise ConstitutionError("the written file does not read back identically", where=str(out))
    print(f"wrote {out}: {written.name} v{written.version}")
    print(f"  {_summary(written)}")
    if not written.feedback_principles:
        print(
            "  note: no feedback principles (the source format has none): AI labelling needs some"
        )
    return 0


def _diff(args: argparse.Namespace) -> int:
    from cai_ray.constitution import load_constitution
    from cai_ray.constitution.diff import diff_constitutions

    a, b = load_constitution(args.a), load_constitution(args.b)
    result = diff_constitutions(a, b)
    print(f"--- {args.a}  ({a.name} v{a.version})")
    print(f"+++ {args.b}  ({b.name} v{b.version})")
    for line in result.lines():
        print(line)
    return 0 if result.identical else 1
