"""Phase: what identifies a merge's output: the config that shapes its bytes and its inputs.

The fingerprint names an output folder (``{fingerprint}`` in OUT) and tells a rerun whether OUT
holds this merge (finished: nothing to do; interrupted: resume) or another one (refused).
Hashing headers and file identities instead of the weights keeps it instant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.config import MergeConfig
from distmerge.engine.request import MergeRequest
from distmerge.lora import LoraTensorInfo
from distmerge.output.journal import merge_fingerprint
from distmerge.plan import MergePlan


@dataclass(frozen=True)
class MergeIdentity:
    """The fingerprint's parts, and the config as the journal records it."""

    parts: dict[str, Any]
    config: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.parts["fingerprint"]

    def output_location(self, out_dir: str | Path) -> str:
        """``out_dir`` (a path or a URL, kept as text) with ``{fingerprint}`` replaced by this merge's."""
        return str(out_dir).replace("{fingerprint}", self.fingerprint)


def fingerprint_config(cfg: MergeConfig) -> dict[str, Any]:
    """The config less what cannot change the output bytes: parallelism, shard size and who runs
    the batches (the executors give identical bytes, tested), so a rerun with another
    ``--executor`` finds its finished output instead of a "different config"."""
    return cfg.model_dump(mode="json", exclude={"execution": {"workers", "shard_size", "executor"}})


def input_fingerprint_data(plan: MergePlan) -> list[tuple[str, Any]]:
    """Per input: tensor headers and the identity (name, size, mtime) of every file it reads."""
    data = []
    for ckpt in plan.inputs:  # a LoRA input adds its adapter's files and each adapted tensor's factors
        data.append((ckpt.label, {
            "tensors": {n: [t.dtype, list(t.shape), Path(t.file).name, t.offset,
                            *([t.identity()] if isinstance(t, LoraTensorInfo) else [])]
                        for n, t in sorted(ckpt.tensors.items())},
            "files": [ckpt.file_identity(f) for f in ckpt.files_read()],
        }))
    if plan.vocabulary is not None:  # the tokenizers decide which input row makes each output row
        digest = hashlib.sha256(json.dumps(sorted(plan.vocabulary.info.vocab.items())).encode())
        for permutation in plan.vocabulary.info.permutations:
            digest.update(permutation.tobytes())
        data.append(("vocabulary", digest.hexdigest()))
    return data


def identify(request: MergeRequest, plan: MergePlan) -> MergeIdentity:
    """The identity of the merge ``request`` asks for, with ``plan``'s inputs."""
    files: dict[str, Path | list[Any]] = {}
    for feature in request.features:
        files.update(feature.fingerprint_files())
    config = fingerprint_config(request.config)
    return MergeIdentity(merge_fingerprint(config, input_fingerprint_data(plan), files), config)
