"""Fixtures for tests, the demo and benchmarks: tiny real checkpoints built locally.

No library module imports this package (``tests/test_architecture.py`` checks it); only
``tests/``, ``benchmarks/`` and :mod:`distmerge.demo` do. It ships inside the package, rather
than under ``tests/``, so that the demo and the benchmarks work from an installed copy.
"""
