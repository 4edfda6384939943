"""Which checksummed ranges of an output a finishing merge reads back: a sample, not every byte.

Why a sample: reading the whole output back doubles a merge's I/O (a 70B merge on an object
store: 140 GB of GETs) to re-prove what is already proven another way. Every range's bytes were
checksummed by the worker that wrote them, from the same buffer; an object store checked each
part's MD5 on arrival; a worker counted the NaN/Inf of every row it produced. What a read-back
adds is evidence that the bytes landed where the layout says (no range written at a wrong
offset, no file cut short, no other writer), and a systematic fault of that kind shows in any
fair sample: the first and last range of every file, and every ``every``-th range of each file
in file order. ``distmerge verify OUT`` still reads every byte, on demand.
"""

from __future__ import annotations

from collections import defaultdict

from distmerge.io.safetensors import TensorInfo

Ranges = dict[str, list[list[int]]]  # tensor -> [[row_start, row_end, crc32], ...]

# A finishing merge reads back about one range in this many (and every file's first and last).
SAMPLE_EVERY = 32


def sampled_ranges(covered: Ranges, infos: dict[str, TensorInfo], every: int) -> Ranges:
    """The ranges of ``covered`` to read back: per file, its first and last range by offset and
    every ``every``-th one between (``every`` <= 1: all of them)."""
    by_file: defaultdict[str, list[tuple[int, str, list[int]]]] = defaultdict(list)
    for name, ranges in covered.items():
        info = infos[name]
        for entry in ranges:
            by_file[str(info.file)].append((info.span(entry[0], entry[1])[0], name, entry))
    chosen: defaultdict[str, list[list[int]]] = defaultdict(list)
    for entries in by_file.values():
        entries.sort(key=lambda e: (e[0], e[1]))
        last = len(entries) - 1
        for i, (_, name, entry) in enumerate(entries):
            if every <= 1 or i in (0, last) or i % every == 0:
                chosen[name].append(entry)
    return {name: sorted(ranges) for name, ranges in chosen.items()}
