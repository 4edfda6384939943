"""distmerge: streaming, distributed merges of large language models on Ray."""

from __future__ import annotations

__version__ = "0.3.0"

__all__ = ["__version__", "run_merge"]


def run_merge(config, out_dir, **options):  # type: ignore[no-untyped-def]
    """Merge as ``distmerge merge`` does; see :func:`distmerge.engine.run.run_merge`."""
    from distmerge.engine.run import run_merge as _run_merge

    return _run_merge(config, out_dir, **options)
