"""An object-store output file cut into parts of whole units: the plan of its multipart upload.

Why parts of whole units: a worker merges a batch of units and uploads their bytes as one part,
so a part is finished exactly when its units are, and a resumed run keeps every part the store
still holds (its units are done) and redoes the rest. Part numbers follow the file's byte order
and are a pure function of the plan and its shard size, so a resumed run (which keeps the
interrupted run's shard size) numbers the same bytes the same way.

S3's rules: every part but the last holds at least 5 MiB, and a file has at most 10,000 parts.
A part aims at half the shard size (8 MiB to 256 MiB), larger where a file would need more parts;
a short tail joins the part before it. The first part starts at byte 0: it carries the header.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from distmerge.plan import MergePlan, WorkUnit

MIN_PART_BYTES = 5 * 1024**2
MAX_PARTS = 10_000
PART_TARGET_RANGE = (8 * 1024**2, 256 * 1024**2)


@dataclass(frozen=True)
class Part:
    """Bytes ``[start, end)`` of output file ``file``, uploaded as part ``number`` (1-based)."""

    file: int
    number: int
    start: int
    end: int
    units: tuple[WorkUnit, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def part_target(shard_size: int, file_size: int) -> int:
    """The bytes a part aims at for a file of ``file_size`` bytes."""
    low, high = PART_TARGET_RANGE
    return max(min(max(shard_size // 2, low), high), -(-file_size // (MAX_PARTS - 1)))


def plan_parts(plan: MergePlan) -> list[Part]:
    """Every output file's parts, in file order, then byte order."""
    by_file: dict[int, list[tuple[int, int, WorkUnit]]] = defaultdict(list)
    for unit in plan.units:
        t = plan.tensors[unit.tensor]
        offset, length = t.out_span(unit.row_start, unit.row_end)
        by_file[t.file_index].append((offset, offset + length, unit))
    parts: list[Part] = []
    for i, f in enumerate(plan.files):
        spans = sorted(by_file.get(i, []), key=lambda s: (s[0], s[1]))
        position = len(f.header)
        for start, end, _ in spans:
            if start != position:
                raise AssertionError(f"{f.name}: units do not tile the file at byte {position} (next at {start})")
            position = end
        if position != f.size:
            raise AssertionError(f"{f.name}: units end at byte {position}, the file at {f.size}")
        parts.extend(_cut(i, f.size, spans, part_target(plan.shard_size, f.size)))
    return parts


def _cut(file: int, size: int, spans: list[tuple[int, int, WorkUnit]], target: int) -> list[Part]:
    groups: list[tuple[int, int, list[WorkUnit]]] = []
    start, units = 0, []
    for _, end, unit in spans:
        units.append(unit)
        if end - start >= target:
            groups.append((start, end, units))
            start, units = end, []
    if units or not groups:
        groups.append((start, size, units))
    if len(groups) > 1 and groups[-1][1] - groups[-1][0] < MIN_PART_BYTES:
        tail = groups.pop()
        groups[-1] = (groups[-1][0], tail[1], groups[-1][2] + tail[2])
    return [Part(file, n, s, e, tuple(u)) for n, (s, e, u) in enumerate(groups, start=1)]
