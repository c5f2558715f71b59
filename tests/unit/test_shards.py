"""The exactly-once key index and the shard store that keeps it."""

from __future__ import annotations

import pickle

import pandas as pd

from cai_ray.data.shards import KeyIndex, ShardStore
from cai_ray.pipeline.common import split_batch


def test_key_index_membership_len_and_compaction():
    index = KeyIndex()
    keys = [f"p{i:016x}" for i in range(20000)]  # past the compaction threshold several times
    index.update(keys)
    index.update(keys[:100])  # again: no growth
    assert len(index) == 20000
    assert all(k in index for k in keys[::97])
    assert "p-not-there" not in index and "" not in index and 7 not in index
    assert index.isin(["p0000000000000003", "nope", keys[-1]]).tolist() == [True, False, True]


def test_key_index_snapshot_is_unchanged_by_later_adds_and_pickles_compactly():
    index = KeyIndex()
    index.update(["a", "b"])
    snap = index.frozen()
    index.add("c")
    assert "c" in index and "c" not in snap and len(snap) == 2
    big = KeyIndex()
    big.update(f"p{i:016x}" for i in range(100_000))
    blob = pickle.dumps(big.frozen())
    assert len(blob) < 100_000 * 9  # 8 bytes a key (a frozenset of the strings: ~1.9 MB)
    back = pickle.loads(blob)
    assert len(back) == 100_000 and "p0000000000000fff" in back and "q" not in back


def test_store_reads_its_keys_back_from_disk_and_sets_duplicates_aside(tmp_path):
    store = ShardStore(tmp_path / "part")
    store.write([{"prompt_id": "p1", "x": 1}, {"prompt_id": "p2", "x": 2}], [])
    store.write([], [{"key": "src#3", "source": "src", "row": 3, "reason": "bad"}])
    resumed = ShardStore(tmp_path / "part")  # a rerun: the keys come from the shards
    assert len(resumed.keys) == 3 and "p2" in resumed.done_keys() and "src#3" in resumed.keys
    assert sorted(resumed.stored_keys()) == ["p1", "p2", "src#3"]
    batch = pd.DataFrame(
        [
            {
                "prompt_id": pid,
                "reject": "",
                "source": "s",
                "row": i,
                "prompt": "q",
                "messages": "[]",
            }
            for i, pid in enumerate(["p2", "p9"])
        ]
    )
    rows, rejects = split_batch(batch, resumed.keys)
    assert [r["prompt_id"] for r in rows] == ["p9"]
    assert [(r["key"], r["reason"]) for r in rejects] == [("s#0", "duplicate prompt_id")]
    assert "p9" in resumed.keys and "s#0" in resumed.keys


def test_the_prompt_reader_stops_after_a_rounds_rows_and_skips_done_keys(tmp_path):
    """A stream round reads only its share of the source (not all of it, then a limit)."""
    import json

    from cai_ray.pipeline.common import SourceRead, _read_source

    src = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"question {i}?"}) for i in range(10)]
    lines.insert(3, lines[1])  # a duplicate row: a reject, keyed by its source row
    src.write_text("\n".join(lines) + "\n")
    item = pd.DataFrame([{"spec": str(src)}])

    def read(done: KeyIndex, rows: int | None) -> list[dict]:
        read = SourceRead(turns="last", limit=None, block_rows=2, rows=rows)
        batches = _read_source(item, read=read, done=done)
        return [r for b in batches for r in b.to_dict("records")]

    done = KeyIndex()
    first = read(done, 4)
    assert len(first) == 4 and [bool(r["reject"]) for r in first] == [False, False, False, True]
    done.update(r["prompt_id"] for r in first)
    second = read(done, 4)
    assert len(second) == 4 and not {r["prompt_id"] for r in second} & {
        r["prompt_id"] for r in first
    }
    done.update(r["prompt_id"] for r in second)
    rest = read(done, 4)
    assert len(rest) == 3  # fewer than a round's rows: the stream's last round
    assert len({r["prompt_id"] for r in first + second + rest}) == 11
