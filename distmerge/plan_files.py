"""The output's files, laid out from names, shapes and dtypes alone: which tensors go in which
file, each file's header bytes and size. No tensor data is read, so every output header is
known before the merge writes a byte (files are created at full size, workers write at offsets).
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.io.safetensors import encode_header, tensor_nbytes


@dataclass(frozen=True)
class OutputFile:
    """One output safetensors file: its final name, header bytes and total size."""

    name: str
    header: bytes
    size: int
    tensors: tuple[str, ...]


def layout_files(entries: list[tuple[str, str, tuple[int, ...]]], max_file_size: int) -> tuple[list[OutputFile], dict[str, tuple[int, int]]]:
    """Group tensors (in order) into files of at most ``max_file_size`` data bytes.

    Returns the files and, per tensor, ``(file index, absolute data offset in that file)``.
    A tensor larger than the limit gets a file of its own. The header bytes are the format's
    (:func:`distmerge.io.safetensors.encode_header`); the grouping and names are the plan's.
    """
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, shape in entries:
        nbytes = tensor_nbytes(dtype, shape)
        if groups[-1] and size + nbytes > max_file_size:
            groups.append([])
            size = 0
        groups[-1].append((name, dtype, shape))
        size += nbytes
    n = len(groups)
    files, where = [], {}
    for i, group in enumerate(groups):
        header, offsets, file_size = encode_header(group)
        where.update((name, (i, offset)) for name, offset in offsets.items())
        files.append(OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", header, file_size,
                                tuple(name for name, _, _ in group)))
    return files, where
