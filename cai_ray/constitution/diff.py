"""Compare two constitutions by principle id: what a policy reviewer needs to see in an amendment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cai_ray.constitution.schema import Constitution

_META = ("name", "version", "description", "source")
_EXAMPLES = ("critique_examples", "feedback_examples", "cot_examples")


@dataclass(frozen=True)
class SectionDiff:
    """Principles of one kind: ids only in A (removed), only in B (added), in both but changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)  # id -> changed fields
    moved: bool = False  # same principles, different order (changes seeded sampling)

    @property
    def empty(self) -> bool:
        """True when nothing in this section differs."""
        return not (self.added or self.removed or self.changed or self.moved)


@dataclass(frozen=True)
class ConstitutionDiff:
    """Everything that differs between constitutions A and B."""

    hash_a: str
    hash_b: str
    metadata: dict[str, tuple[Any, Any]]  # field -> (A value, B value)
    critique: SectionDiff
    feedback: SectionDiff
    examples: dict[str, tuple[int, int, bool]]  # section -> (count A, count B, content differs)

    @property
    def identical(self) -> bool:
        """True when the content hashes match."""
        return self.hash_a == self.hash_b

    def lines(self) -> list[str]:
        """A readable report, one finding per line."""
        if self.identical:
            return [f"identical (hash {self.hash_a[:12]})"]
        out = [f"hash: {self.hash_a[:12]} -> {self.hash_b[:12]}"]
        for key, (a, b) in self.metadata.items():
            if len(repr(a)) + len(repr(b)) < 80:
                out.append(f"{key}: {a!r} -> {b!r}")
            else:
                out += [f"{key} changed:", f"  - {a}", f"  + {b}"]
        for title, section in (
            ("critique principles", self.critique),
            ("feedback principles", self.feedback),
        ):
            if section.empty:
                continue
            out.append(
                f"{title}: {len(section.added)} added, {len(section.removed)} removed, "
                f"{len(section.changed)} changed"
            )
            out += [f"  + {pid}" for pid in section.added]
            out += [f"  - {pid}" for pid in section.removed]
            out += [f"  ~ {pid} ({', '.join(fields)})" for pid, fields in section.changed.items()]
            if section.moved:
                out.append("  (order changed)")
        for name, (a, b, differs) in self.examples.items():
            if differs:
                note = "" if a != b else " (content changed)"
                out.append(f"{name.replace('_', ' ')}: {a} -> {b}{note}")
        return out


def _section(a: list[Any], b: list[Any]) -> SectionDiff:
    by_id_a = {p.id: p for p in a}
    by_id_b = {p.id: p for p in b}
    changed = {}
    for pid in by_id_a.keys() & by_id_b.keys():
        da, db = by_id_a[pid].model_dump(), by_id_b[pid].model_dump()
        fields = [k for k in da if da[k] != db[k]]
        if fields:
            changed[pid] = fields
    common_a = [p.id for p in a if p.id in by_id_b]
    common_b = [p.id for p in b if p.id in by_id_a]
    return SectionDiff(
        added=[p.id for p in b if p.id not in by_id_a],
        removed=[p.id for p in a if p.id not in by_id_b],
        changed={pid: changed[pid] for pid in common_a if pid in changed},
        moved=common_a != common_b,
    )


def diff_constitutions(a: Constitution, b: Constitution) -> ConstitutionDiff:
    """What changed from A to B: metadata, principles by id, few-shot example counts, hashes."""
    metadata = {k: (getattr(a, k), getattr(b, k)) for k in _META if getattr(a, k) != getattr(b, k)}
    examples = {}
    for name in _EXAMPLES:
        ea, eb = getattr(a, name), getattr(b, name)
        examples[name] = (
            len(ea),
            len(eb),
            [e.model_dump() for e in ea] != [e.model_dump() for e in eb],
        )
    return ConstitutionDiff(
        hash_a=a.content_hash,
        hash_b=b.content_hash,
        metadata=metadata,
        critique=_section(a.critique_principles, b.critique_principles),
        feedback=_section(a.feedback_principles, b.feedback_principles),
        examples=examples,
    )
