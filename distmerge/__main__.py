"""``python -m distmerge`` is the ``distmerge`` command."""

import sys

from distmerge.cli import main

sys.exit(main())
