"""The AIM statistics file: safetensors, one float32 vector per module, with provenance.

Keys are ``named_modules()`` names (``model.layers.0.self_attn.q_proj``, ``model.norm``,
``lm_head``). Metadata records what produced the numbers (base model, dataset, sequences, block
size, tokens) so a merge can reuse a file knowingly. Loading validates the file so a wrong or
damaged file fails with a message instead of relaxing weights with garbage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distmerge.errors import ConfigError
from distmerge.io.files import require_regular
from distmerge.io.writes import write_bytes_atomic

FORMAT = "distmerge-aim-statistics"
# Where a merge saves the statistics it calibrated, inside its output directory (reused on resume).
SAVED_NAME = "aim_statistics.safetensors"
VERSION = "1"
REQUIRED_METADATA = ("base_model", "dataset", "n_blocks", "block_size", "tokens")


def save_statistics(stats: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write statistics as float32 safetensors, atomically (a temporary name, fsync, rename), through
    the one writer every output file uses (so with the same permissions: safetensors' own
    ``save_file`` creates 0600 files, where the model files beside them are 0644)."""
    from safetensors.torch import save

    path = Path(path)
    if not stats:
        raise ValueError("no statistics to save")
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, version=VERSION)
    tensors = {name: v.detach().to("cpu", torch.float32).contiguous() for name, v in stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, save(tensors, metadata=meta))


def load_statistics(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and validate a statistics file; ConfigError naming the file and the problem."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"aim.stats: {path} does not exist; run `distmerge calibrate` to make it")
    require_regular(path, "aim.stats", ConfigError)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            stats = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"aim.stats: {path} is not a readable safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"aim.stats: {path} is not an AIM statistics file (metadata format={metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise ConfigError(f"aim.stats: {path} has version {metadata.get('version')!r}; this distmerge reads {VERSION}")
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ConfigError(f"aim.stats: {path} lacks metadata {', '.join(missing)}")
    if not stats:
        raise ConfigError(f"aim.stats: {path} holds no statistics")
    for name, value in stats.items():
        if value.dim() != 1 or value.numel() == 0 or value.dtype != torch.float32:
            raise ConfigError(
                f"aim.stats: {path}: {name!r} should be a non-empty float32 vector, got "
                f"{value.dtype} of shape {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ConfigError(f"aim.stats: {path}: {name!r} has negative or non-finite values; the file is damaged")
    return stats, metadata


def match_statistics(stats: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Which tensors the statistics relax, and by which module's statistic: ``{tensor: module}``.

    ``shapes`` maps the merged tensors' names to their shapes. A tensor that
    :func:`~distmerge.aim.relax.module_for_tensor` maps to a module with a statistic is relaxed,
    and the statistic must have one value per input channel (``shape[-1]``); a module without a
    statistic is merged unrelaxed. A mis-sized statistic, or statistics that match no tensor at
    all, mean the file was made for another model: a ConfigError naming the module.
    """
    from distmerge.aim.relax import module_for_tensor

    matched, unmatched = {}, []
    for tensor, shape in shapes.items():
        module = module_for_tensor(tensor)
        if module is None:
            continue
        if module not in stats:
            unmatched.append(module)
            continue
        channels = shape[-1] if shape else 1
        if stats[module].numel() != channels:
            raise ConfigError(
                f"aim.stats: module {module!r} has {stats[module].numel()} channels but tensor {tensor!r} "
                f"has {channels} input channels; the statistics belong to another model"
            )
        matched[tensor] = module
    if not matched:
        example = f" (no statistic for module {unmatched[0]!r}, ...)" if unmatched else ""
        raise ConfigError(f"aim: none of the statistics match a tensor of this model{example}; check aim.stats")
    return matched
