"""``python -m distmerge`` is the ``distmerge`` command."""

from distmerge.cli import run

run()
