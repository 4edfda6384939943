"""Run by mergekit 0.1.5's own venv (never distmerge's): merge ``MODEL+ADAPTER`` the way mergekit
does (``ModelReference.merged``: PEFT ``merge_and_unload``) and save it to ``OUT``."""

import shutil
import sys
import tempfile
from pathlib import Path

from mergekit.common import ModelReference

model, adapter, out = sys.argv[1:4]
with tempfile.TemporaryDirectory() as cache:
    merged = ModelReference.model_validate(f"{model}+{adapter}").merged(cache_dir=cache)
    shutil.copytree(merged.model.path, out)
print("merged", Path(out))
