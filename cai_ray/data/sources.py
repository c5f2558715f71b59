"""Prompt and comparison sources: JSONL/JSON, Parquet, Hugging Face `save_to_disk` folders, samples.

Reading (files -> raw row dicts) is split from parsing (one row -> records or a `Reject`) so the
parsers can run per row inside a Ray Data batch. Bad rows are set aside with a reason and
counted; a source that cannot be read at all raises `DataError`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from numbers import Integral
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from cai_ray.data.conversation import ASSISTANT_MARKER, Conversation, split_transcript
from cai_ray.errors import ConfigError, DataError

Format = Literal["jsonl", "json", "parquet", "hf_disk", "sample"]
TURNS = ("first", "every", "last")
# Training samples, then stage 7's held-out sets (own words; no training stage reads them).
TRAINING_SAMPLES = ("red_team", "helpful", "hh_helpful_pairs")
EVAL_SAMPLES = ("eval_harmful", "eval_benign")
SAMPLES = TRAINING_SAMPLES + EVAL_SAMPLES
PROMPT_COLUMNS = ("messages", "prompt", "chosen+rejected", "transcript")
ROW_KEY = "_row"  # added to every raw row: its 1-based line (JSONL) or row number
ERROR_KEY, RAW_KEY = "_error", "_raw"  # a raw row that could not be decoded carries these
_RAW_MAX = 500
_SUFFIXES: dict[str, Format] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class _Bad(Exception):
    """A row-level problem: `category: detail` becomes the Reject reason."""

    def __init__(self, category: str, detail: str = ""):
        super().__init__(f"{category}: {detail}" if detail else category)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: the conversation up to a user turn, with a stable id and its origin."""

    prompt_id: str
    conversation: Conversation
    source: str
    row: int

    def to_row(self) -> dict[str, Any]:
        """A JSON/Arrow-friendly row: prompt_id, prompt (last user text), messages, source, row."""
        return {
            "prompt_id": self.prompt_id,
            "prompt": self.conversation.last_user_message,
            "messages": self.conversation.to_messages(),
            "source": self.source,
            "row": self.row,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PromptRecord:
        """Inverse of `to_row` (for records read back from a stage's Parquet output)."""
        conversation = Conversation.from_messages(row["messages"])
        return cls(row["prompt_id"], conversation, row["source"], int(row["row"]))


@dataclass(frozen=True)
class Comparison:
    """A preference pair: the shared conversation and the chosen / rejected final replies."""

    pair_id: str
    conversation: Conversation
    chosen: str
    rejected: str
    source: str
    row: int

    def to_row(self) -> dict[str, Any]:
        """A JSON/Arrow-friendly row (pair_id, prompt, messages, chosen, rejected, source, row)."""
        return {
            "pair_id": self.pair_id,
            "prompt": self.conversation.last_user_message,
            "messages": self.conversation.to_messages(),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "source": self.source,
            "row": self.row,
        }


@dataclass(frozen=True)
class Reject:
    """A row set aside: where it was, why (`category: detail`), and a truncated repr of it."""

    source: str
    row: int
    reason: str
    raw: str

    @classmethod
    def of(cls, row: Any, *, source: str, index: int, reason: str) -> Reject:
        """A reject for `row`, its repr cut to 500 characters."""
        if isinstance(row, Mapping) and ERROR_KEY in row:
            text = str(row.get(RAW_KEY, ""))
        elif isinstance(row, Mapping):
            text = repr({k: v for k, v in row.items() if k != ROW_KEY})
        else:
            text = repr(row)
        raw = text if len(text) <= _RAW_MAX else text[: _RAW_MAX - 3] + "..."
        return cls(source, index, reason, raw)

    @property
    def where(self) -> str:
        """`source row N`, for messages."""
        return f"{self.source} row {self.row}"

    def to_row(self) -> dict[str, Any]:
        """A JSON-able row for a stage manifest."""
        return {"source": self.source, "row": self.row, "reason": self.reason, "raw": self.raw}


T = TypeVar("T", PromptRecord, Comparison)


@dataclass
class ReadResult(Generic[T]):
    """What a read kept (`records`) and set aside (`rejects`), with counts."""

    source: str
    records: list[T] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def n_records(self) -> int:
        """How many records were kept."""
        return len(self.records)

    @property
    def n_rejects(self) -> int:
        """How many rows (or prompts of a row) were set aside."""
        return len(self.rejects)

    @property
    def reject_counts(self) -> dict[str, int]:
        """Rejects counted by reason category (the text before the first colon)."""
        return dict(Counter(r.reason.split(":", 1)[0] for r in self.rejects))


PromptReadResult = ReadResult[PromptRecord]
ComparisonReadResult = ReadResult[Comparison]


# --- row parsing: pure functions of one row, safe inside a Ray Data map_batches -------------


def parse_prompt_row(
    row: Mapping[str, Any], *, source: str, index: int, turns: str = "first"
) -> list[PromptRecord] | Reject:
    """Parse one raw row into prompts (one per selected user turn) or a Reject.

    Columns, first present wins: `messages` (chat list), `prompt` (text, transcript or chat
    list), `chosen`+`rejected` (hh-rlhf: their shared prefix), `transcript` (red-team rows).
    `turns`: "first" user turn, "every" user turn with the conversation before it, or "last".
    An own `prompt_id`/`id` column names the first user turn; later ones get `:t<k>` appended.
    """
    _check_turns(turns)
    try:
        row = _as_row(row)
        conversation = _row_conversation(row)
        own_id = _own_id(row, ("prompt_id", "id"))
        users = [i for i, t in enumerate(conversation.turns) if t.role == "user"]
        if not users:
            raise _Bad("no user turn")
    except _Bad as exc:
        return Reject.of(row, source=source, index=index, reason=str(exc))
    picked = {"first": users[:1], "last": users[-1:], "every": users}[turns]
    records = []
    for end in picked:
        prompt = Conversation(conversation.turns[: end + 1])
        k = users.index(end) + 1
        pid = prompt.prompt_id if own_id is None else own_id if k == 1 else f"{own_id}:t{k}"
        records.append(PromptRecord(pid, prompt, source, index))
    return records


def parse_comparison_row(row: Mapping[str, Any], *, source: str, index: int) -> Comparison | Reject:
    """Parse one preference row into a Comparison or a Reject.

    hh-rlhf rows: `chosen`/`rejected` transcripts that share all but the last Assistant turn.
    Explicit-prompt rows (TRL layout): `prompt` plus plain-text `chosen`/`rejected` replies.
    """
    try:
        row = _as_row(row)
        if row.get("chosen") is None or row.get("rejected") is None:
            raise _Bad("no comparison columns", "expected 'chosen' and 'rejected'")
        conversation, chosen, rejected = _comparison_parts(row)
        if chosen == rejected:
            raise _Bad("chosen/rejected identical", "the two replies are the same text")
        own_id = _own_id(row, ("pair_id", "id"))
    except _Bad as exc:
        return Reject.of(row, source=source, index=index, reason=str(exc))
    if own_id is None:
        payload = {"messages": conversation.to_messages(), "chosen": chosen, "rejected": rejected}
        own_id = "c" + _digest(payload)
    return Comparison(own_id, conversation, chosen, rejected, source, index)


def _as_row(row: Any) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise _Bad("not an object", f"row is a {type(row).__name__}")
    if ERROR_KEY in row:
        raise _Bad(str(row[ERROR_KEY]))
    return dict(row)


def _row_conversation(row: dict[str, Any]) -> Conversation:
    if row.get("messages") is not None:
        return _messages(row["messages"], "messages")
    if row.get("prompt") is not None:
        return _prompt_conversation(row["prompt"])
    if row.get("chosen") is not None and row.get("rejected") is not None:
        return _comparison_parts(row)[0]
    if row.get("transcript") is not None:
        return _transcript(_text(row["transcript"], "transcript"), "transcript")
    found = ", ".join(sorted(k for k in row if k != ROW_KEY)) or "none"
    raise _Bad("no prompt column", f"expected one of {', '.join(PROMPT_COLUMNS)}; found {found}")


def _prompt_conversation(value: Any) -> Conversation:
    if isinstance(value, str):
        text = _text(value, "prompt")
        if _is_transcript(text):
            return _transcript(text, "prompt")
        return Conversation.from_prompt(text)
    if isinstance(value, list | tuple) or hasattr(value, "tolist"):
        return _messages(value, "prompt")  # TRL's conversational layout keeps messages here
    raise _Bad("not text", f"column 'prompt' is a {type(value).__name__}")


def _comparison_parts(row: dict[str, Any]) -> tuple[Conversation, str, str]:
    chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
    if row.get("prompt") is not None and not _is_transcript(chosen):
        conversation = _prompt_conversation(row["prompt"])
        chosen, rejected = chosen.strip(), rejected.strip()
    else:
        conversation, chosen = _split_reply(chosen, "chosen")
        rejected_prefix, rejected = _split_reply(rejected, "rejected")
        if rejected_prefix != conversation:
            raise _Bad("chosen/rejected mismatch", "they differ before the last Assistant turn")
    return conversation, chosen, rejected


def _split_reply(text: str, column: str) -> tuple[Conversation, str]:
    """Split an hh-rlhf transcript into (conversation before the last reply, last reply)."""
    try:
        pairs = split_transcript(text)
    except DataError as exc:
        raise _Bad("bad transcript", f"column '{column}': {exc.message}") from None
    if pairs[-1][0] != "assistant":
        raise _Bad("bad transcript", f"column '{column}' does not end with an Assistant turn")
    prefix = _transcript(text[: text.rfind(ASSISTANT_MARKER)], column)
    return prefix, pairs[-1][1]


def _messages(value: Any, column: str) -> Conversation:
    try:
        return Conversation.from_messages(value)
    except DataError as exc:
        where = f", {exc.where}" if exc.where else ""
        raise _Bad("bad messages", f"column '{column}'{where}: {exc.message}") from None


def _transcript(text: str, column: str) -> Conversation:
    try:
        return Conversation.from_transcript(text)
    except DataError as exc:
        raise _Bad("bad transcript", f"column '{column}': {exc.message}") from None


def _text(value: Any, column: str) -> str:
    if not isinstance(value, str):
        raise _Bad("not text", f"column '{column}' is a {type(value).__name__}")
    if not value.strip():
        raise _Bad("empty prompt" if column == "prompt" else "empty text", f"column '{column}'")
    return value.strip() if column == "prompt" else value


def _is_transcript(text: str) -> bool:
    return "\n\nHuman:" in text or text.lstrip().startswith("Human:")


def _own_id(row: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    for column in columns:
        value = row.get(column)
        if value is None:
            continue
        # numbers.Integral also admits numpy integers from pandas / Ray Data batches
        if (
            isinstance(value, bool)
            or not isinstance(value, str | Integral)
            or not str(value).strip()
        ):
            raise _Bad("bad id", f"column '{column}' must be non-empty text or an integer")
        return str(value).strip()
    return None


def _digest(payload: Any) -> str:
    canonical = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _check_turns(turns: str) -> None:
    if turns not in TURNS:
        raise ConfigError(
            f"unknown turns option {turns!r}", where="turns", hint="use " + "|".join(TURNS)
        )


# --- reading ---------------------------------------------------------------------------------


def read_prompts(
    spec: str | Path, *, turns: str = "first", limit: int | None = None
) -> PromptReadResult:
    """Read and parse every row of a prompt source; duplicates of a prompt_id become rejects."""
    _check_turns(turns)
    source = str(spec)

    def parse(row: dict[str, Any]) -> list[PromptRecord] | Reject:
        return parse_prompt_row(row, source=source, index=row.get(ROW_KEY, 0), turns=turns)

    return _read(spec, parse, id_name="prompt_id", limit=limit)


def read_comparisons(spec: str | Path, *, limit: int | None = None) -> ComparisonReadResult:
    """Read and parse preference rows (hh-rlhf or explicit-prompt layout); see `read_prompts`."""
    source = str(spec)

    def parse(row: dict[str, Any]) -> Comparison | Reject:
        return parse_comparison_row(row, source=source, index=row.get(ROW_KEY, 0))

    return _read(spec, parse, id_name="pair_id", limit=limit)


def _read(spec: str | Path, parse: Callable, *, id_name: str, limit: int | None) -> ReadResult:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1 (got {limit})", where="limit")
    result: ReadResult = ReadResult(source=str(spec))
    first_seen: set[str] = set()
    for row in iter_prompt_rows(spec):
        parsed = parse(row)
        if isinstance(parsed, Reject):
            result.rejects.append(parsed)
            continue
        for record in parsed if isinstance(parsed, list) else [parsed]:
            key = getattr(record, id_name)
            if key in first_seen:
                reason = f"duplicate {id_name}"
                result.rejects.append(
                    Reject.of(row, source=result.source, index=record.row, reason=reason)
                )
                continue
            first_seen.add(key)
            result.records.append(record)
            if limit is not None and result.n_records >= limit:
                return result
    if not result.records:
        reasons = "; ".join(f"row {r.row}: {r.reason}" for r in result.rejects[:3])
        raise DataError(
            f"no valid rows ({result.n_rejects} rejected: {reasons})",
            where=str(resolve_source(spec)),
            hint=f"rows need one of the columns {', '.join(PROMPT_COLUMNS)} with text in it",
        )
    return result


def iter_prompt_rows(spec: str | Path, *, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the raw rows of a source, each with `_row` (its 1-based line or row number).

    A JSONL line that is not a JSON object comes as `{_row, _error, _raw}`, which the parsers
    turn into a Reject. Raises DataError when the source is missing, empty or unreadable.
    """
    path = resolve_source(spec)
    fmt = detect_format(path)
    readers = {"jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet}
    rows = readers[fmt](path) if fmt in readers else _iter_hf_disk(path)
    count = 0
    for row in rows:
        if limit is not None and count >= limit:
            return
        count += 1
        yield row
    if count == 0:
        raise DataError(
            "the source has no rows", where=str(path), hint="check the file is complete"
        )


def sample_path(name: str) -> Path:
    """The packaged sample file `cai_ray/data/samples/<name>.jsonl`."""
    if name not in SAMPLES:
        raise DataError(
            f"unknown sample {name!r}",
            where=f"sample:{name}",
            hint="use one of " + ", ".join(f"sample:{s}" for s in SAMPLES),
        )
    return Path(str(resources.files("cai_ray.data") / "samples" / f"{name}.jsonl"))


def resolve_source(spec: str | Path) -> Path:
    """The path a source spec names (`sample:NAME` or a file/folder); DataError if missing."""
    if isinstance(spec, str) and spec.startswith("sample:"):
        path = sample_path(spec.removeprefix("sample:"))
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            "no such file or folder",
            where=str(path),
            hint="give a JSONL/JSON/Parquet file, a datasets save_to_disk folder, or sample:NAME",
        )
    return path


def detect_format(path: str | Path) -> Format:
    """Which reader a source needs, from its spec, suffix or folder layout."""
    if isinstance(path, str) and path.startswith("sample:"):
        return "sample"
    path = Path(path)
    if path.is_dir():
        if any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            return "hf_disk"
        raise DataError(
            "folder is not a Hugging Face datasets folder (no state.json or dataset_dict.json)",
            where=str(path),
            hint="save it with Dataset.save_to_disk, or point at a JSONL/Parquet file",
        )
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unsupported file type {path.suffix or '(no suffix)'!r}",
            where=str(path),
            hint="use .jsonl, .json, .parquet or a datasets save_to_disk folder",
        )
    return fmt


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
            except _JSON_ERRORS as exc:
                yield _error_row(number, f"invalid JSON: {_json_problem(exc)}", line)
                continue
            if isinstance(value, dict):
                yield {**value, ROW_KEY: number}
            else:
                yield _error_row(number, f"invalid JSON: line is a {type(value).__name__}", line)


def _iter_json(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if not head.startswith("["):
        yield from _iter_jsonl(path)  # datasets' to_json writes JSON lines under .json
        return
    try:
        items = json.loads(path.read_text(encoding="utf-8-sig"))
    except _JSON_ERRORS as exc:
        raise DataError(
            f"not valid JSON: {_json_problem(exc)}", where=str(path), hint="fix the file"
        ) from None
    for number, item in enumerate(items, start=1):
        if isinstance(item, dict):
            yield {**item, ROW_KEY: number}
        else:
            yield _error_row(number, f"invalid JSON: item is a {type(item).__name__}", repr(item))


# ValueError covers JSONDecodeError, UnicodeDecodeError and Python's 4300-digit int limit;
# RecursionError comes from deeply nested arrays such as `[[[[...]]]]`.
_JSON_ERRORS = (ValueError, RecursionError)


def _json_problem(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _error_row(number: int, reason: str, raw: bytes | str) -> dict[str, Any]:
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    return {ROW_KEY: number, ERROR_KEY: reason, RAW_KEY: text.strip()[:_RAW_MAX]}


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", where=str(path)) from None
    _check_columns(parquet.schema_arrow.names, path)
    yield from _numbered(parquet.iter_batches(batch_size=1024))


def _iter_hf_disk(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    folder = _hf_split_folder(path)
    files = _hf_arrow_files(folder)
    batches = (batch for file in files for batch in _arrow_batches(file, pa))
    for row in _numbered(batches):
        if row[ROW_KEY] == 1:
            _check_columns(list(row), folder)
        yield row


def _numbered(batches: Iterator[Any]) -> Iterator[dict[str, Any]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield {**row, ROW_KEY: number}


def _check_columns(names: list[str], where: Path) -> None:
    usable = {"messages", "prompt", "transcript"} & set(names)
    if not usable and not {"chosen", "rejected"} <= set(names):
        raise DataError(
            f"no usable column (found: {', '.join(n for n in names if n != ROW_KEY) or 'none'})",
            where=str(where),
            hint=f"the data needs one of the columns {', '.join(PROMPT_COLUMNS)}",
        )


def _hf_split_folder(path: Path) -> Path:
    """A `save_to_disk` Dataset folder; a DatasetDict root resolves to its only split."""
    if not (path / "dataset_dict.json").exists():
        return path
    splits = _load_json(path / "dataset_dict.json").get("splits") or []
    if len(splits) != 1:
        example = path / (splits[0] if splits else "train")
        raise DataError(
            f"a DatasetDict with splits {splits}: which one?",
            where=str(path),
            hint=f"point at one split folder, e.g. {example}",
        )
    return path / splits[0]


def _hf_arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    if state.exists():
        entries = _load_json(state).get("_data_files") or []
        files = [folder / entry["filename"] for entry in entries if "filename" in entry]
    else:
        files = sorted(folder.glob("data-*.arrow"))
    missing = [f.name for f in files if not f.exists()]
    if not files or missing:
        raise DataError(
            f"Arrow data files missing: {missing or 'none listed'}",
            where=str(folder),
            hint="the folder should hold the data-0000x-of-0000y.arrow files save_to_disk wrote",
        )
    return files


def _arrow_batches(file: Path, pa: Any) -> Iterator[Any]:
    # save_to_disk writes the Arrow IPC *stream* format; accept the file format too.
    with pa.memory_map(str(file)) as source:
        try:
            stream = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            stream = None
        if stream is not None:
            yield from stream
            return
        source.seek(0)
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as exc:
            raise DataError(f"not an Arrow file: {exc}", where=str(file)) from None
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, *_JSON_ERRORS) as exc:
        raise DataError(f"unreadable JSON: {_json_problem(exc)}", where=str(path)) from None
    if not isinstance(value, dict):
        raise DataError("expected a JSON object", where=str(path))
    return value
