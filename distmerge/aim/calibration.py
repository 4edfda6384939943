"""``calibrate``: sequences, statistics and their file in one call, as ``distmerge calibrate`` does."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from distmerge.aim.layout import open_base
from distmerge.aim.pipeline import calibrate_stages
from distmerge.aim.sequences import load_calibration_sequences
from distmerge.aim.stats_file import save_statistics
from distmerge.config import AimConfig
from distmerge.errors import ConfigError
from distmerge.io.locations import is_remote

log = logging.getLogger(__name__)


def calibrate(
    base_model: Path, aim: AimConfig, out_path: Path | None = None, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Calibrate ``base_model`` per ``aim``; save the statistics to ``out_path`` if given.

    Returns the statistics and the metadata recorded with them.
    """
    from distmerge.lora import split_reference

    if split_reference(str(base_model))[1] is not None:
        raise ConfigError(f"base_model {base_model}: AIM calibration runs the base model itself, and a LoRA base "
                          "(MODEL+ADAPTER) is not supported there; merge the adapter into the model first, or "
                          "give precomputed statistics with aim.stats")
    cal = aim.calibration
    base = str(base_model)  # a folder, a Hub id or s3:// (Path() would fold s3:// into s3:/)
    # The model folder's own checks first (config.json, weight headers, the layers' tensors), as
    # a merge makes them: a broken config.json is then named as such, not as the tokenizer
    # loader's failure. The token ids are checked against its embedding by calibrate_stages.
    opened = open_base(base)
    sequences = load_calibration_sequences(cal, base)
    stats, stages = calibrate_stages(
        base, sequences, stages=aim.stages, stage_memory=aim.stage_memory,
        micro_batch_size=aim.micro_batch_size, progress=progress, opened=opened,
    )
    metadata = {
        "base_model": base if is_remote(base) or not os.path.exists(base) else str(Path(base).resolve()),
        "dataset": cal.dataset if cal.dataset == "builtin" or is_remote(cal.dataset) else str(Path(cal.dataset).resolve()),
        "text_field": cal.text_field,
        "n_samples": str(cal.n_samples),
        "seed": str(cal.seed),
        "n_blocks": str(sequences.shape[0]),
        "block_size": str(sequences.shape[1]),
        "tokens": str(sequences.numel()),
        # provenance: which node ran which layers (a loopback cluster's nodes share an address)
        "stages": json.dumps([{"layers": list(r["layers"]), "node_id": r["node_id"], "node_address": r["node_address"],
                               "device": r["device"], "weight_bytes": r["bytes"]} for r in stages]),
    }
    if out_path is not None:
        save_statistics(stats, out_path, metadata)
        log.info("AIM statistics saved to %s", out_path)
    return stats, metadata

