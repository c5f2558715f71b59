"""Prompt sources: every format, row parsing, rejects with reasons, stable ids, samples."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray.data.conversation import Conversation
from cai_ray.data.sources import (
    SAMPLES,
    PromptRecord,
    Reject,
    detect_format,
    iter_prompt_rows,
    parse_comparison_row,
    parse_prompt_row,
    read_comparisons,
    read_prompts,
    resolve_source,
    sample_path,
)
from cai_ray.errors import ConfigError, DataError

HH_PREFIX = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke"
HH_ROW = {
    "chosen": HH_PREFIX + "\n\nAssistant: Why did the chicken cross the road?",
    "rejected": HH_PREFIX + "\n\nAssistant: No.",
}


def _parse(row, turns="first"):
    return parse_prompt_row(row, source="s", index=7, turns=turns)


def _write_jsonl(path: Path, lines: list) -> Path:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


# --- row parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "  How do I bake bread?  "},
        {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:"},
        {"prompt": [{"role": "user", "content": "How do I bake bread?"}]},
        {"messages": [{"role": "user", "content": "How do I bake bread?"}], "prompt": "ignored"},
        {"transcript": "\n\nHuman: How do I bake bread?\n\nAssistant: Flour, water, time."},
        {
            "chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Knead it.",
            "rejected": "Human: How do I bake bread?\n\nAssistant: No.",
        },
    ],
)
def test_each_column_layout_gives_the_same_prompt(row):
    records = _parse(row)
    assert isinstance(records, list) and len(records) == 1
    record = records[0]
    assert record.conversation == Conversation.from_prompt("How do I bake bread?")
    assert record.prompt_id == record.conversation.prompt_id
    assert (record.source, record.row) == ("s", 7)


def test_hh_row_prompt_is_shared_prefix_first_and_every():
    (first,) = _parse(HH_ROW)
    assert first.conversation.to_messages() == [{"role": "user", "content": "hi"}]
    every = _parse(HH_ROW, turns="every")
    assert [len(r.conversation.turns) for r in every] == [1, 3]
    assert every[1].conversation.last_user_message == "tell me a joke"
    assert every[1].conversation.turns[1].content == "hello"
    (last,) = _parse(HH_ROW, turns="last")
    assert last == every[1]


def test_own_id_column_and_turn_suffix():
    row = {"id": 12, "transcript": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"}
    assert [r.prompt_id for r in _parse(row, turns="every")] == ["12", "12:t2"]
    assert _parse({"prompt_id": "x1", "id": "ignored", "prompt": "q"})[0].prompt_id == "x1"
    np = pytest.importorskip("numpy")
    assert _parse({"id": np.int64(4), "prompt": "q"})[0].prompt_id == "4"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"text": "hello"}, "no prompt column: expected one of messages, prompt"),
        ({"prompt": 5}, "not text: column 'prompt' is a int"),
        ({"prompt": "   "}, "empty prompt"),
        ({"prompt": None}, "no prompt column"),
        ({"transcript": "no markers here"}, "bad transcript: column 'transcript'"),
        (
            {"messages": [{"role": "bot", "content": "x"}]},
            "bad messages: column 'messages', message 0",
        ),
        ({"messages": [{"role": "system", "content": "s"}]}, "no user turn"),
        ({"prompt": "q", "id": ""}, "bad id"),
        ({"prompt": "q", "id": 1.5}, "bad id"),
        (
            {"chosen": HH_ROW["chosen"], "rejected": "\n\nHuman: other\n\nAssistant: x"},
            "chosen/rejected mismatch",
        ),
        (
            {"chosen": HH_PREFIX, "rejected": HH_ROW["rejected"]},
            "bad transcript: column 'chosen' does not end",
        ),
        ({"_row": 3, "_error": "invalid JSON: oops", "_raw": "{oops"}, "invalid JSON: oops"),
        (["not", "a", "dict"], "not an object"),
    ],
)
def test_bad_rows_are_rejects_with_reasons(row, reason):
    result = _parse(row)
    assert isinstance(result, Reject)
    assert result.reason.startswith(reason), result.reason
    assert (result.source, result.row) == ("s", 7)
    assert len(result.raw) <= 500


def test_reject_raw_is_truncated():
    result = _parse({"prompt": 1, "blob": "x" * 2000})
    assert isinstance(result, Reject) and len(result.raw) == 500 and result.raw.endswith("...")


def test_unknown_turns_option_is_config_error():
    with pytest.raises(ConfigError, match="turns"):
        _parse({"prompt": "q"}, turns="all")


def test_record_row_roundtrip_is_json_able():
    (record,) = _parse(HH_ROW, turns="last")
    row = record.to_row()
    assert row["prompt"] == "tell me a joke"
    assert PromptRecord.from_row(json.loads(json.dumps(row))) == record


def test_parse_comparison_row_hh_and_explicit_layouts():
    pair = parse_comparison_row(HH_ROW, source="s", index=1)
    assert not isinstance(pair, Reject)
    assert pair.chosen == "Why did the chicken cross the road?" and pair.rejected == "No."
    assert pair.conversation.last_user_message == "tell me a joke"
    assert pair.pair_id.startswith("c") and len(pair.pair_id) == 17
    explicit = parse_comparison_row(
        {"prompt": "q", "chosen": " yes ", "rejected": "no", "id": "k"}, source="s", index=2
    )
    assert not isinstance(explicit, Reject)
    assert (explicit.pair_id, explicit.chosen, explicit.conversation.last_user_message) == (
        "k",
        "yes",
        "q",
    )
    # an empty final reply is a legitimate (bad) answer in hh-rlhf
    empty = parse_comparison_row(
        {**HH_ROW, "rejected": HH_PREFIX + "\n\nAssistant:"}, source="s", index=3
    )
    assert not isinstance(empty, Reject) and empty.rejected == ""


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "q"}, "no comparison columns"),
        ({**HH_ROW, "rejected": HH_ROW["chosen"]}, "chosen/rejected identical"),
        ({**HH_ROW, "rejected": 3}, "not text: column 'rejected'"),
    ],
)
def test_parse_comparison_row_rejects(row, reason):
    result = parse_comparison_row(row, source="s", index=4)
    assert isinstance(result, Reject) and result.reason.startswith(reason), result


# --- files ----------------------------------------------------------------------------------


def test_jsonl_rejects_counted_with_line_numbers(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "one"},
            "",
            "{not json",
            "[1, 2]",
            {"prompt": 3},
            {"prompt": "one"},
            {"prompt": "two"},
        ],
    )
    result = read_prompts(path)
    assert [r.conversation.last_user_message for r in result.records] == ["one", "two"]
    assert [r.row for r in result.records] == [1, 7]
    assert [(r.row, r.reason.split(":")[0]) for r in result.rejects] == [
        (3, "invalid JSON"),
        (4, "invalid JSON"),
        (5, "not text"),
        (6, "duplicate prompt_id"),
    ]
    assert result.rejects[-1].reason == "duplicate prompt_id"
    assert result.reject_counts == {"invalid JSON": 2, "not text": 1, "duplicate prompt_id": 1}
    assert (result.n_records, result.n_rejects) == (2, 4)
    assert result.rejects[0].raw == "{not json"


def test_ids_stable_across_reads_and_formats(tmp_path):
    rows = [{"prompt": "alpha"}, {"messages": [{"role": "user", "content": "beta"}]}]
    jsonl = _write_jsonl(tmp_path / "a.jsonl", rows)
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "alpha"}, {"prompt": "beta"}]), parquet)
    ids = [r.prompt_id for r in read_prompts(jsonl).records]
    assert ids == [r.prompt_id for r in read_prompts(jsonl).records]
    assert ids == [r.prompt_id for r in read_prompts(parquet).records]
    assert ids == [
        Conversation.from_prompt("alpha").prompt_id,
        Conversation.from_prompt("beta").prompt_id,
    ]


def test_every_turns_and_limit(tmp_path):
    path = _write_jsonl(
        tmp_path / "hh.jsonl", [HH_ROW, {**HH_ROW, "rejected": HH_PREFIX + "\n\nAssistant: Meh."}]
    )
    every = read_prompts(path, turns="every")
    # the second row repeats both prompts of the first: duplicates, not silently dropped
    assert every.n_records == 2 and every.reject_counts == {"duplicate prompt_id": 2}
    assert read_prompts(path, turns="every", limit=1).n_records == 1
    with pytest.raises(ConfigError, match="limit"):
        read_prompts(path, limit=0)


def test_json_array_and_json_lines_under_json_suffix(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "x"}, 5, {"prompt": "y"}]))
    result = read_prompts(array)
    assert [r.row for r in result.records] == [1, 3] and result.rejects[0].row == 2
    lines = _write_jsonl(tmp_path / "b.json", [{"prompt": "x"}, {"prompt": "y"}])
    assert detect_format(lines) == "json" and read_prompts(lines).n_records == 2
    broken = tmp_path / "c.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_prompts(broken)


def test_parquet_with_messages_column(tmp_path):
    path = tmp_path / "m.parquet"
    messages = [
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    ]
    pq.write_table(pa.Table.from_pylist([{"messages": m, "id": "r1"} for m in messages]), path)
    assert detect_format(path) == "parquet"
    result = read_prompts(path, turns="every")
    assert [r.prompt_id for r in result.records] == ["r1", "r1:t2"]
    assert result.records[1].conversation.last_user_message == "c"


def test_parquet_source_errors(tmp_path):
    no_column = tmp_path / "x.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "hi"}]), no_column)
    with pytest.raises(DataError, match="no usable column") as info:
        read_prompts(no_column)
    assert info.value.where == str(no_column)
    corrupt = tmp_path / "y.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_prompts(corrupt)
    empty = tmp_path / "z.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="no rows"):
        read_prompts(empty)


def _hf_dataset_dir(folder: Path, batches: list[list[dict]]) -> Path:
    """A `save_to_disk` Dataset folder written by hand: Arrow stream files + state.json."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(batches):05d}.arrow" for i in range(len(batches))]
    for name, rows in zip(names, batches, strict=True):
        table = pa.Table.from_pylist(rows)
        with (
            pa.OSFile(str(folder / name), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as writer,
        ):
            writer.write_table(table)
    features = {"prompt": {"dtype": "string", "_type": "Value"}}
    (folder / "dataset_info.json").write_text(json.dumps({"description": "", "features": features}))
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_hf_disk_dataset_and_dataset_dict(tmp_path):
    single = _hf_dataset_dir(
        tmp_path / "ds", [[{"prompt": "a"}, {"prompt": ""}], [{"prompt": "b"}]]
    )
    assert detect_format(single) == "hf_disk"
    result = read_prompts(single)
    assert [(r.row, r.conversation.last_user_message) for r in result.records] == [
        (1, "a"),
        (3, "b"),
    ]
    assert result.reject_counts == {"empty prompt": 1}

    root = tmp_path / "dd"
    _hf_dataset_dir(root / "train", [[{"prompt": "t"}]])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert detect_format(root) == "hf_disk"
    assert read_prompts(root).records[0].conversation.last_user_message == "t"
    _hf_dataset_dir(root / "test", [[{"prompt": "u"}]])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match="which one") as info:
        read_prompts(root)
    assert "train" in (info.value.hint or "")
    assert read_prompts(root / "test").records[0].conversation.last_user_message == "u"


def test_hf_disk_missing_arrow_file(tmp_path):
    folder = _hf_dataset_dir(tmp_path / "ds", [[{"prompt": "a"}]])
    next(folder.glob("*.arrow")).unlink()
    with pytest.raises(DataError, match="Arrow data files missing"):
        read_prompts(folder)


def test_hf_disk_written_by_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "real"
    datasets.Dataset.from_list(
        [{"prompt": "a", "id": "1"}, {"prompt": "b", "id": "2"}]
    ).save_to_disk(str(path))
    assert [r.prompt_id for r in read_prompts(path).records] == ["1", "2"]
    dd = tmp_path / "real_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "c"}])}).save_to_disk(
        str(dd)
    )
    assert read_prompts(dd).n_records == 1


def test_source_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file") as info:
        read_prompts(tmp_path / "missing.jsonl")
    assert info.value.where == str(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        read_prompts(empty)
    all_bad = _write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, {"prompt": ""}])
    with pytest.raises(
        DataError, match=r"no valid rows \(2 rejected: row 1: no prompt column"
    ) as info:
        read_prompts(all_bad)
    assert "row 2: empty prompt" in info.value.message
    csv = tmp_path / "x.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'"):
        read_prompts(csv)
    with pytest.raises(DataError, match="not a Hugging Face datasets folder"):
        read_prompts(tmp_path)


def test_iter_prompt_rows_streams_raw_rows(tmp_path):
    path = _write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "a", "extra": 1}, {"prompt": "b"}, {"prompt": "c"}]
    )
    rows = list(iter_prompt_rows(path, limit=2))
    assert rows == [{"prompt": "a", "extra": 1, "_row": 1}, {"prompt": "b", "_row": 2}]


def test_read_comparisons_from_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [HH_ROW, HH_ROW, {"prompt": "q"}])
    result = read_comparisons(path)
    assert result.n_records == 1
    assert result.reject_counts == {"duplicate pair_id": 1, "no comparison columns": 1}


# --- samples --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_parse_cleanly(name):
    assert detect_format(f"sample:{name}") == "sample"
    assert resolve_source(f"sample:{name}") == sample_path(name)
    result = read_prompts(f"sample:{name}")
    assert result.n_rejects == 0
    least = {"hh_helpful_pairs": 20, "eval_harmful": 100, "eval_benign": 100}.get(name, 30)
    assert result.n_records >= least
    assert all(r.source == f"sample:{name}" for r in result.records)


def test_sample_pairs_are_comparisons():
    result = read_comparisons("sample:hh_helpful_pairs")
    assert result.n_rejects == 0 and result.n_records >= 20
    assert any(len(c.conversation.turns) > 1 for c in result.records)  # some multi-turn rows


def test_unknown_sample_is_data_error():
    with pytest.raises(DataError, match="unknown sample") as info:
        read_prompts("sample:nope")
    assert "sample:red_team" in (info.value.hint or "")
