"""How an object-store output file is cut into upload parts (pure: no store involved)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from distmerge.output.parts import MAX_PARTS, MIN_PART_BYTES, part_target, plan_parts
from distmerge.plan import WorkUnit

MiB = 1024**2


@dataclass(frozen=True)
class FakeTensor:
    file_index: int
    offset: int
    row_bytes: int

    def out_span(self, r0: int, r1: int) -> tuple[int, int]:
        return self.offset + r0 * self.row_bytes, (r1 - r0) * self.row_bytes


def fake_plan(files: list[list[tuple[int, int]]], shard_size: int, header: int = 1000):
    """``files``: per file, its tensors as (rows, row bytes); one unit per ``unit_rows`` rows."""
    tensors, units, out_files = [], [], []
    for f, spec in enumerate(files):
        offset = header
        for rows, row_bytes in spec:
            t = FakeTensor(f, offset, row_bytes)
            step = max(1, shard_size // 4 // row_bytes)
            for r0 in range(0, rows, step):
                units.append(WorkUnit(len(tensors), r0, min(rows, r0 + step), 0, 0, 0))
            tensors.append(t)
            offset += rows * row_bytes
        out_files.append(SimpleNamespace(name=f"f{f}", header=b"h" * header, size=offset))
    return SimpleNamespace(tensors=tensors, units=units, files=out_files, shard_size=shard_size)


def test_parts_tile_each_file_in_order_with_whole_units_and_s3_sizes():
    plan = fake_plan([[(4096, 4096), (1, 8192), (3000, 11008)], [(10, 100)], [(7, 3 * MiB)]], 16 * MiB)
    parts = plan_parts(plan)
    for f, file in enumerate(plan.files):
        mine = [p for p in parts if p.file == f]
        assert [p.number for p in mine] == list(range(1, len(mine) + 1))
        assert mine[0].start == 0 and mine[-1].end == file.size  # the first part carries the header
        assert all(a.end == b.start for a, b in zip(mine, mine[1:], strict=False))
        assert all(p.nbytes >= MIN_PART_BYTES for p in mine[:-1])
        for p in mine:  # a part is its units' bytes (and the header)
            spans = sorted(plan.tensors[u.tensor].out_span(u.row_start, u.row_end) for u in p.units)
            assert sum(n for _, n in spans) == p.nbytes - (len(file.header) if p.number == 1 else 0)
    assert sorted((u.tensor, u.row_start) for p in parts for u in p.units) == \
        sorted((u.tensor, u.row_start) for u in plan.units)
    file0 = [p for p in parts if p.file == 0]
    assert len(file0) > 2 and max(p.nbytes for p in file0) < part_target(16 * MiB, plan.files[0].size) + 4 * MiB
    assert [p.nbytes for p in parts if p.file == 1] == [plan.files[1].size]  # small file: one part


def test_a_short_tail_joins_the_part_before_and_huge_files_stay_under_the_part_limit():
    plan = fake_plan([[(9, MiB)]], 16 * MiB)  # 9 MiB + header: one 8 MiB part would leave a 1 MiB tail
    (only,) = plan_parts(plan)
    assert only.nbytes == plan.files[0].size
    assert part_target(64 * MiB, 10 * 10**12) * (MAX_PARTS - 1) >= 10 * 10**12  # 10 TB file: <= 10,000 parts
    assert part_target(1 * MiB, 10 * MiB) == 8 * MiB and part_target(10**12, 10 * MiB) == 256 * MiB


def test_units_that_do_not_tile_the_file_are_a_bug_caught_early():
    plan = fake_plan([[(10, 100)]], MiB)
    plan.files[0].size += 1
    with pytest.raises(AssertionError, match="units end at byte"):
        plan_parts(plan)
