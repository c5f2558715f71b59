"""Import the two public constitution formats into our schema.

- Anthropic's paper files (a directory): `CritiqueRevisionInstructions.json` (critique/revision
  pairs wrapped in "\\n\\nCritiqueRequest: ...\\n\\nCritique:" markers), `RLMadisonInstructions.json`
  (feedback questions) and three few-shot files, kept as raw transcripts that we parse here.
- Hugging Face's llm-swarm layout (one JSON file): `constitutions` [{critic, revision}] and
  `system_chat` [[chat messages]]. It has no feedback principles, so the import has none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from cai_ray.constitution.loader import constitution_from_dict
from cai_ray.constitution.schema import Constitution
from cai_ray.errors import ConstitutionError

Format = Literal["anthropic", "hf"]
CRITIQUE_FILE = "CritiqueRevisionInstructions.json"
FEEDBACK_FILE = "RLMadisonInstructions.json"
CRITIQUE_SHOTS_FILE = "CritiqueRevisionFewShotPrompts.json"
FEEDBACK_SHOTS_FILE = "RLMadisonFewShotPrompts.json"
COT_SHOTS_FILE = "RLMadisonPrecogFewShotPrompts.json"
ANTHROPIC_FILES = (
    CRITIQUE_FILE,
    FEEDBACK_FILE,
    CRITIQUE_SHOTS_FILE,
    FEEDBACK_SHOTS_FILE,
    COT_SHOTS_FILE,
)

_MARKER = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_ROUND = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
# The chain-of-thought file's layout: conversation as H:/A: lines, "{}" where the principle goes,
# options in [[[...]]], then the rationale and the answer (the first line may lack its newlines).
_COT = re.compile(
    r"^\s*Human:\s*Consider the following conversation between a human(?: \(H\))?"
    r" and an assistant(?: \(A\))?:\s*(?P<conv>.*?)\n\n\{\}\n"
    r"\s*\(A\) \[\[\[(?P<a>.*?)\]\]\]\n\s*\(B\) \[\[\[(?P<b>.*?)\]\]\]\s*"
    r"Assistant:\s*Let's think step by step:(?P<rationale>.*?)"
    r"\n\nHuman:\s*So the answer is:\s*\((?P<answer>[AB])\)\s*$",
    re.S,
)
_COT_TURN = re.compile(r"(?:^|\n\n)(H|A|Human|Assistant):")


def detect_format(src: str | Path) -> tuple[Format, Path]:
    """Which format `src` holds, and the path to read (the directory for Anthropic's files)."""
    src = Path(src)
    if src.is_dir():
        if any((src / name).is_file() for name in (CRITIQUE_FILE, FEEDBACK_FILE)):
            return "anthropic", src
        raise ConstitutionError(
            f"no {CRITIQUE_FILE} or {FEEDBACK_FILE} in this directory",
            where=str(src),
            hint="point at Anthropic's prompts/ directory, or at a Hugging Face JSON file",
        )
    if src.name in ANTHROPIC_FILES:
        return "anthropic", src.parent
    data = _read_json(src)
    if isinstance(data, dict) and "constitutions" in data:
        return "hf", src
    raise ConstitutionError(
        "cannot tell the format: not Anthropic's prompt files nor a JSON with `constitutions`",
        where=str(src),
        hint="pass --format anthropic|hf",
    )


def import_constitution(
    src: str | Path, *, fmt: Format | None = None, name: str | None = None
) -> Constitution:
    """Import a public-format constitution (format detected unless `fmt` is given)."""
    if fmt is None:
        fmt, src = detect_format(src)
    elif fmt == "anthropic" and Path(src).is_file():
        src = Path(src).parent
    data = import_anthropic(src) if fmt == "anthropic" else import_hf(src)
    if name:
        data["name"] = name
    return constitution_from_dict(data, where=str(src))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConstitutionError("file not found", where=str(path)) from None
    except json.JSONDecodeError as exc:
        raise ConstitutionError(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConstitutionError(f"cannot read the file: {exc}", where=str(path)) from None
    except (ValueError, RecursionError) as exc:  # a 5000-digit number; `[[[[...` nesting
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConstitutionError(f"invalid JSON: {problem}", where=str(path)) from None


def _expect(ok: bool, message: str, where: str) -> None:
    if not ok:
        raise ConstitutionError(
            message, where=where, hint="the file does not match the expected layout"
        )


def _text(value: Any, where: str) -> str:
    _expect(isinstance(value, str), f"expected text, got {type(value).__name__}", where)
    return value


def _strip_markers(text: str, head: str, tail: str) -> str:
    """ "\\n\\nCritiqueRequest: X\\n\\nCritique:" -> "X"."""
    text = text.strip()
    text = text.removeprefix(head).strip()
    return text.removesuffix(tail).strip()


# ---- Anthropic -----------------------------------------------------------------------------------


def import_anthropic(directory: str | Path) -> dict[str, Any]:
    """Read Anthropic's paper files from `directory` into unvalidated constitution content."""
    directory = Path(directory)
    files = {name: directory / name for name in ANTHROPIC_FILES if (directory / name).is_file()}
    _expect(
        CRITIQUE_FILE in files or FEEDBACK_FILE in files,
        f"neither {CRITIQUE_FILE} nor {FEEDBACK_FILE} found",
        str(directory),
    )
    critique = _anthropic_critique(files[CRITIQUE_FILE]) if CRITIQUE_FILE in files else []
    data: dict[str, Any] = {
        "name": "anthropic-cai-paper",
        "version": "1.0",
        "description": "The constitution of the Constitutional AI paper (Bai et al. 2022, "
        "arXiv 2212.08073), imported from Anthropic's prompt files.",
        "source": "github.com/anthropics/ConstitutionalHarmlessnessPaper prompts/ (Anthropic format)",
        "critique_principles": critique,
        "feedback_principles": [],
    }
    if FEEDBACK_FILE in files:
        data["feedback_principles"] = _anthropic_feedback(files[FEEDBACK_FILE])
    if CRITIQUE_SHOTS_FILE in files:
        path = files[CRITIQUE_SHOTS_FILE]
        data["critique_examples"] = [
            _anthropic_critique_example(text, critique, f"{path}: entry {i}")
            for i, text in enumerate(_list_of(path, str))
        ]
    if FEEDBACK_SHOTS_FILE in files:
        data["feedback_examples"] = _anthropic_feedback_examples(files[FEEDBACK_SHOTS_FILE])
    if COT_SHOTS_FILE in files:
        path = files[COT_SHOTS_FILE]
        data["cot_examples"] = [
            _anthropic_cot_example(entry, f"{path}: entry {i}")
            for i, entry in enumerate(_list_of(path, dict))
        ]
    return data


def _list_of(path: Path, kind: type) -> list[Any]:
    data = _read_json(path)
    _expect(isinstance(data, list), f"expected a JSON list, got {type(data).__name__}", str(path))
    for i, item in enumerate(data):
        _expect(isinstance(item, kind), f"expected {kind.__name__} entries", f"{path}: entry {i}")
    return data


def _anthropic_critique(path: Path) -> list[dict[str, str]]:
    data = _read_json(path)
    _expect(isinstance(data, dict), "expected a JSON object of principles", str(path))
    out = []
    for key, entry in data.items():
        where = f"{path}: {key}"
        _expect(
            isinstance(entry, dict) and {"prompt", "edit_request"} <= set(entry),
            "expected {'prompt': [...], 'edit_request': ...}",
            where,
        )
        prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"]]
        edit = _text(entry["edit_request"], where)
        revision = _strip_markers(edit, "RevisionRequest:", "Revision:")
        for j, prompt in enumerate(prompts):
            # One request per key in the paper's file; should a key hold several, keep them all.
            pid = key if len(prompts) == 1 else f"{key}.{j}"
            critique = _strip_markers(_text(prompt, where), "CritiqueRequest:", "Critique:")
            out.append({"id": pid, "critique": critique, "revision": revision})
    return out


def _anthropic_feedback(path: Path) -> list[dict[str, str]]:
    # The question keeps its trailing "Options:": the paper's prompt lists (A)/(B) right after it.
    return [
        {"id": f"feedback{i}", "question": text.strip()}
        for i, text in enumerate(_list_of(path, str))
    ]


def _split_transcript(text: str, where: str) -> list[tuple[str, str]]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b..." -> [("Human", "a"), ("Assistant", "b"), ...]."""
    parts = _MARKER.split("\n\n" + text.lstrip())
    _expect(not parts[0].strip(), f"text before the first marker: {parts[0][:40]!r}", where)
    pairs = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    # Transcripts end with an empty "Human:" / "Assistant:" that opens the next turn.
    while pairs and not pairs[-1][1] and pairs[-1][0] in _ROLES:
        pairs.pop()
    return pairs


def _anthropic_critique_example(
    text: str, principles: list[dict[str, str]], where: str
) -> dict[str, Any]:
    pairs = _split_transcript(text, where)
    n_turns = next((i for i, (m, _) in enumerate(pairs) if m not in _ROLES), len(pairs))
    conversation = [{"role": _ROLES[m], "content": c} for m, c in pairs[:n_turns]]
    steps = pairs[n_turns:]
    _expect(
        steps and len(steps) % 4 == 0,
        "expected CritiqueRequest/Critique/RevisionRequest/Revision rounds after the conversation",
        where,
    )
    by_text = {(p["critique"], p["revision"]): p["id"] for p in principles}
    rounds = []
    for k in range(0, len(steps), 4):
        markers = tuple(m for m, _ in steps[k : k + 4])
        _expect(markers == _ROUND, f"expected markers {_ROUND}, got {markers}", where)
        request, critique, revision_request, revision = (c for _, c in steps[k : k + 4])
        rounds.append(_round(request, critique, revision_request, revision, by_text))
    return {"conversation": conversation, "rounds": rounds}


def _round(
    request: str, critique: str, revision_request: str, revision: str, by_text: dict
) -> dict[str, str]:
    # Name the principle only when both request texts are exactly its own: the few-shot files
    # often word them differently, and those words are what the model saw.
    pid = by_text.get((request, revision_request))
    if pid is not None:
        return {"principle": pid, "critique": critique, "revision": revision}
    return {
        "critique_request": request,
        "critique": critique,
        "revision_request": revision_request,
        "revision": revision,
    }


def _anthropic_feedback_examples(path: Path) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(_list_of(path, dict)):
        where = f"{path}: entry {i}"
        _expect(
            {"prompt", "corrects", "incorrects"} <= set(entry),
            "expected prompt, corrects, incorrects",
            where,
        )
        pairs = _split_transcript(_text(entry["prompt"], where), where)
        _expect(all(m in _ROLES for m, _ in pairs), "expected only Human/Assistant turns", where)
        conversation = [{"role": _ROLES[m], "content": c} for m, c in pairs]
        for good in entry["corrects"]:
            for bad in entry["incorrects"]:
                _text(good, where)
                _text(bad, where)
                # The file only says which reply is right; alternate its position so the
                # few-shot block does not teach "the answer is always (A)" (position bias).
                first = len(out) % 2 == 0
                out.append(
                    {
                        "conversation": conversation,
                        "response_a": good if first else bad,
                        "response_b": bad if first else good,
                        "answer": "A" if first else "B",
                    }
                )
    return out


def _anthropic_cot_example(entry: dict[str, Any], where: str) -> dict[str, Any]:
    match = _COT.match(_text(entry.get("prompt"), where))
    if match is None:
        raise ConstitutionError(
            "not in the chain-of-thought layout: H:/A: turns, {}, [[[options]]], "
            '"Let\'s think step by step:", "So the answer is: (X)"',
            where=where,
            hint="the file does not match the expected layout",
        )
    parts = _COT_TURN.split(match["conv"].strip())
    _expect(not parts[0].strip(), "the conversation must start with 'H:'", where)
    conversation = [
        {
            "role": "user" if parts[i] in ("H", "Human") else "assistant",
            "content": parts[i + 1].strip(),
        }
        for i in range(1, len(parts), 2)
    ]
    return {
        "conversation": conversation,
        "response_a": match["a"].strip(),
        "response_b": match["b"].strip(),
        "answer": match["answer"],
        "rationale": match["rationale"].strip(),
    }


# ---- Hugging Face --------------------------------------------------------------------------------


def import_hf(path: str | Path) -> dict[str, Any]:
    """Read a Hugging Face llm-swarm constitution JSON into unvalidated constitution content."""
    path = Path(path)
    data = _read_json(path)
    _expect(
        isinstance(data, dict) and "constitutions" in data,
        "expected a JSON object with `constitutions` (and optionally `system_chat`)",
        str(path),
    )
    unknown = set(data) - {"constitutions", "system_chat"}
    _expect(not unknown, f"unknown keys {sorted(unknown)}", str(path))
    principles = []
    for i, entry in enumerate(data["constitutions"]):
        where = f"{path}: constitutions[{i}]"
        _expect(
            isinstance(entry, dict) and set(entry) == {"critic", "revision"},
            "expected {'critic': ..., 'revision': ...}",
            where,
        )
        critique, revision = (_text(entry[k], where).strip() for k in ("critic", "revision"))
        principles.append({"id": f"principle{i}", "critique": critique, "revision": revision})
    examples = [
        _hf_example(chat, principles, f"{path}: system_chat[{i}]")
        for i, chat in enumerate(data.get("system_chat") or [])
    ]
    return {
        "name": path.stem.replace("_", "-"),
        "version": "1.0",
        "description": f"Imported from the Hugging Face llm-swarm constitution {path.name}. "
        "That format has critique/revision pairs and chat few-shot examples only: no feedback "
        "principles, so this constitution cannot drive AI labelling.",
        "source": f"{path.name} (Hugging Face llm-swarm format)",
        "critique_principles": principles,
        "feedback_principles": [],
        "critique_examples": examples,
    }


def _hf_example(chat: Any, principles: list[dict[str, str]], where: str) -> dict[str, Any]:
    _expect(
        isinstance(chat, list)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in chat),
        "expected a list of {role, content} messages",
        where,
    )
    messages = [(m["role"], _text(m["content"], where).strip()) for m in chat]
    start = 1 if messages and messages[0][0] == "system" else 0
    roles = [r for r, _ in messages[start:]]
    expected = ["user", "assistant"] * (len(roles) // 2)
    _expect(
        roles == expected and len(roles) >= 6,
        "expected alternating user/assistant "
        "messages: a conversation, then critique request, critique, revision request, "
        "revision",
        where,
    )
    by_text = {(p["critique"], p["revision"]): p["id"] for p in principles}
    critics = {p["critique"] for p in principles}
    # The last four messages are one round. Earlier groups of four count as rounds only when
    # their request is one of the constitution's own texts: otherwise they are conversation.
    end = len(messages) - 4
    while end - 4 >= start + 2 and messages[end - 4][1] in critics:
        end -= 4
    rounds = [
        _round(messages[k][1], messages[k + 1][1], messages[k + 2][1], messages[k + 3][1], by_text)
        for k in range(end, len(messages), 4)
    ]
    conversation = [{"role": r, "content": c} for r, c in messages[:end]]
    return {"conversation": conversation, "rounds": rounds}
