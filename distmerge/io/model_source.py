"""Where a model named in a config lives: a local folder, an S3 or Cloud Storage prefix or a Hub repository.

Why a model becomes "a local folder of its small files plus weight files anywhere": everything
that reads a model's config, index and tokenizer (the planner, AIM's layout, transformers'
tokenizer, the output's side files) works on a folder, and those files are small (KBs to tens
of MBs), so they are fetched once and kept in a cache. The weights are not fetched: their
locations (``s3://...``, ``gs://...``, ``hf://org/name@<commit>/...``) go into the plan, and each worker
reads only the byte ranges of the rows it merges. A Hub revision is pinned to the commit it
points to when the model is opened, so every node reads the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from distmerge.errors import DistmergeError
from distmerge.io.locations import (
    HUB_SCHEME,
    OBJECT_STORE_SCHEMES,
    LocationError,
    RemoteLocation,
    hub_reference,
    parse_remote,
    url_scheme,
)
from distmerge.io.writes import write_bytes_atomic

# Files of a model folder fetched into the local folder (never weights).
SMALL_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model",
)
MAX_SMALL_FILE_BYTES = 256 * 1000**2  # a tokenizer.json of a 256k vocabulary is ~30 MB
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelSource:
    """A model as the planner opens it.

    ``folder`` holds its small files; ``weights`` maps each top-level ``*.safetensors`` file name
    to its location (None: the weights are the folder's own files, as for a local model);
    ``names`` is every top-level file of the model; ``versions`` what identifies each remote
    file's content (size and ETag or commit), for fingerprints.
    """

    reference: str
    folder: Path
    weights: dict[str, str] | None = None
    names: tuple[str, ...] = ()
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.weights is not None


def cache_home() -> Path:
    """distmerge's cache (``DISTMERGE_CACHE``, or ~/.cache/distmerge)."""
    return Path(os.environ.get("DISTMERGE_CACHE") or Path.home() / ".cache" / "distmerge")


def cache_root() -> Path:
    """Where small files of remote models are kept."""
    return cache_home() / "remote"


_located: dict[tuple[str | None, ...], ModelSource] = {}


def locate_model(reference: str, role: str, error: type[DistmergeError] = DistmergeError) -> ModelSource:
    """Resolve a config's model reference; remote models get their small files fetched.

    A remote model is resolved once per process (per endpoint and cache): every part of a plan
    that opens it (weights, tokenizer, vocabulary size) sees the same Hub commit and ETags.
    """
    if url_scheme(reference) is None and os.path.exists(reference):
        return ModelSource(reference, Path(reference))
    key = (reference, *(os.environ.get(k) for k in _SETTINGS))
    if key not in _located:
        _located[key] = _locate(reference, role, error)
    return _located[key]


# What a remote model's resolution depends on besides its reference.
_SETTINGS = ("HF_ENDPOINT", "HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "AWS_ENDPOINT_URL_S3",
             "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "DISTMERGE_CACHE")


def _locate(reference: str, role: str, error: type[DistmergeError]) -> ModelSource:
    try:
        hub = hub_reference(reference)
        scheme = url_scheme(reference)
        if hub is not None:
            try:
                return _hub_model(reference, hub, role, error)
            except error as e:
                if scheme is None:  # a bare ``org/name``: say why it was not read as a folder
                    raise error(f"{e} [no local folder {reference!r} exists (relative to {os.getcwd()}), "
                                "so it was read as a Hugging Face Hub id]") from None
                raise
        if scheme in OBJECT_STORE_SCHEMES:
            return _object_store_model(reference, parse_remote(reference), role, error)
    except LocationError as e:
        raise error(f"{role} {e}") from None
    if scheme is not None:
        raise error(f"{role} {reference}: {scheme}:// is not a place distmerge reads models from (yet); use a local "
                    "folder, s3:// or gs://bucket/prefix or a Hugging Face Hub id (org/name[@revision])")
    return ModelSource(reference, Path(reference))


def _object_store_model(reference: str, where: RemoteLocation, role: str, error: type[DistmergeError]
                        ) -> ModelSource:
    from distmerge.io.object_stores import object_store

    store = object_store(reference)

    where = RemoteLocation(where.scheme, where.container, where.key.rstrip("/"))  # a folder: s3://b/p/ is s3://b/p
    listing = store.list_folder(where, f"the {role}'s files", error)
    if not listing:
        raise error(f"{role} {reference}: no objects under this prefix; check the bucket and prefix "
                    "(a model folder holds config.json and *.safetensors files)")
    versions = {name: (st.size, st.version) for name, st in listing.items()}
    small = {n: versions[n] for n in SMALL_FILES if n in versions}
    for name, (size, _) in small.items():
        if size > MAX_SMALL_FILE_BYTES:
            raise error(f"{role} {where.child(name)}: {size} bytes, more than a {name} can be; refused")
    digest = hashlib.sha256(repr((str(where), sorted(small.items()))).encode()).hexdigest()[:24]
    folder = cache_root() / where.scheme / where.container / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, _) in small.items():
        target = folder / name
        if target.is_file() and target.stat().st_size == size:
            continue  # fetched before, and the cache folder is named by the files' versions
        with store.reader.open_reader(str(where.child(name)), name, error) as reader:
            write_bytes_atomic(target, reader.read(0, size))
    weights = {n: str(where.child(n)) for n in listing if n.endswith(WEIGHT_SUFFIX)}
    return ModelSource(reference, folder, weights, tuple(sorted(listing)), versions)


def _hub_model(reference: str, repo: RemoteLocation, role: str, error: type[DistmergeError]) -> ModelSource:
    from distmerge.io import hub

    if hub.offline():  # only the cache: a complete cached snapshot is a local folder
        return ModelSource(reference, hub.cached_snapshot(repo, f"the {role}", error))
    commit, files = hub.resolve(repo, f"the {role}", error)
    top = [n for n in files if "/" not in n]
    pinned = RemoteLocation(HUB_SCHEME, repo.container, "", commit)
    small = [n for n in SMALL_FILES if n in top]
    if "config.json" not in small:
        raise error(f"{role} {reference}: the repository has no config.json at {commit[:12]}; a model "
                    "repository needs one (is it a dataset or a GGUF-only repository?)")
    paths = {n: hub.download(repo, commit, n, n, error) for n in small}
    folder = paths["config.json"].parent
    weights = {n: str(pinned.child(n)) for n in top if n.endswith(WEIGHT_SUFFIX)}
    return ModelSource(reference, folder, weights, tuple(sorted(top)), {n: (0, commit) for n in top})
