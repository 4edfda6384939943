"""Hugging Face Hub repositories: ``hf://org/name@<commit>/file`` read by HTTP range requests.

Why through huggingface_hub: it is where users' Hub settings already live (the token from
``HF_TOKEN`` or ``huggingface-cli login``, ``HF_ENDPOINT`` for mirrors and private hubs,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``), so a config copied from a model card behaves as it does
in transformers. Small files (config, index, tokenizer) are downloaded into the Hub cache with
``hf_hub_download``; weight files already in the cache are read from disk, the others by range
requests of exactly the rows a worker merges, never downloaded whole.

``HF_ENDPOINT`` is read at each call (huggingface_hub reads it once, at import), so a process
that sets it later, or a Ray worker given it by its runtime environment, uses it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.io.locations import RemoteLocation, parse_remote, redacted
from distmerge.io.remote import RemoteReader, RemoteStorage, SizeCache

STREAM_CHUNK = 1 << 20
_SIZES = SizeCache()
_TRANSIENT_NAMES = {"TransportError", "TimeoutException", "ConnectionError", "TimeoutError", "ChunkedEncodingError"}


def _hub() -> Any:
    import huggingface_hub
    import huggingface_hub.constants
    import huggingface_hub.utils  # noqa: F401 - submodules the package loads lazily

    return huggingface_hub


def endpoint() -> str:
    """The Hub endpoint: ``HF_ENDPOINT`` now, else huggingface_hub's default."""
    return (os.environ.get("HF_ENDPOINT") or _hub().constants.ENDPOINT).rstrip("/")


def shown_endpoint() -> str:
    """The endpoint as messages show it (without any credentials in the URL)."""
    return redacted(endpoint())


def cache_dir() -> str | None:
    """The Hub cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub, read now); None: the library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now): only what the Hub cache holds may be used."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE") \
        or bool(_hub().constants.HF_HUB_OFFLINE)


def transient(e: BaseException) -> bool:
    """Dropped connections, timeouts, 429 and 5xx answers are worth asking again for (a host
    name that does not resolve is not: it is a wrong HF_ENDPOINT or no network)."""
    if "Name or service not known" in str(e) or "nodename nor servname" in str(e):
        return False
    if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
        return True
    status = getattr(getattr(e, "response", None), "status_code", 0) or 0
    return status >= 500 or status == 429


def explain(e: BaseException, location: str, what: str) -> str:
    """A message a user can act on, for a Hub error about ``location``."""
    kind = type(e).__name__
    if kind == "GatedRepoError":
        return (f"{location}: the repository is gated; accept its terms on the Hub and give a token "
                "(HF_TOKEN or `huggingface-cli login`)")
    if kind == "RepositoryNotFoundError":
        return (f"{location}: no such repository on the Hub at {shown_endpoint()} (or it is private and no valid "
                "token was given: set HF_TOKEN), and no local folder of that name either")
    if kind == "RevisionNotFoundError":
        return f"{location}: the repository has no such revision (branch, tag or commit)"
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"{location}: {what} is not in the repository"
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (f"{location}: {what} is not in the Hub cache and HF_HUB_OFFLINE is set (or the Hub cannot be "
                "reached); download it once with network access")
    if kind in ("ConnectError", "ConnectionError", "ConnectTimeout"):
        return (f"{location}: cannot reach the Hub at {shown_endpoint()} for {what} ({str(e)[:120]}); check the network "
                "or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use only the Hub cache")
    status = getattr(getattr(e, "response", None), "status_code", 0)
    if status in (401, 403):
        return f"{location}: access denied reading {what} (HTTP {status}); check HF_TOKEN"
    if transient(e):
        return f"{location}: the Hub at {shown_endpoint()} kept failing while reading {what} ({kind}: {str(e)[:200]})"
    return f"{location}: reading {what} from the Hub failed ({kind}: {str(e)[:300]})"


def _worded(call: Any, location: str, what: str, error: type[DistmergeError]) -> Any:
    from distmerge.io.retry import with_retries

    try:
        return with_retries(call, f"{what} at {location}", transient)
    except DistmergeError:
        raise
    except Exception as e:  # noqa: BLE001 - worded for the user
        raise error(explain(e, location, what)) from None


def resolve(repo: RemoteLocation, what: str, error: type[DistmergeError]) -> tuple[str, list[str]]:
    """The commit a repository's revision points to now, and the files it holds."""
    info = _worded(lambda: _hub().HfApi(endpoint=endpoint()).model_info(repo.container, revision=repo.revision),
                   str(repo), what, error)
    if not info.sha:
        raise error(f"{repo}: the Hub did not say which commit the revision is; cannot pin the files")
    return str(info.sha), [s.rfilename for s in (info.siblings or [])]


def download(repo: RemoteLocation, commit: str, name: str, what: str, error: type[DistmergeError]) -> Path:
    """One (small) file of the repository at ``commit``, through the Hub cache."""
    return Path(_worded(lambda: _hub().hf_hub_download(repo.container, name, revision=commit, endpoint=endpoint(),
                                                         cache_dir=cache_dir()),
                        str(repo.child(name)), what, error))


def cached_snapshot(repo: RemoteLocation, what: str, error: type[DistmergeError]) -> Path:
    """The cached snapshot folder of ``repo`` (offline mode: nothing is fetched)."""
    return Path(_worded(lambda: _hub().snapshot_download(repo.container, revision=repo.revision,
                                                         local_files_only=True, cache_dir=cache_dir()),
                        str(repo), what, error))


def cached_file(repo: RemoteLocation, commit: str, name: str) -> Path | None:
    """``name`` at ``commit`` when the Hub cache already holds it (read from disk, then)."""
    found = _hub().try_to_load_from_cache(repo.container, name, revision=commit, cache_dir=cache_dir())
    return Path(found) if isinstance(found, str) else None


class HubStorage(RemoteStorage):
    """Range requests to ``{HF_ENDPOINT}/{repo}/resolve/{commit}/{file}`` with the user's token.

    A file this node's Hub cache already holds is read from disk instead (each node decides for
    itself, so a cache on the driver's node never sends other nodes to a path they lack).
    """

    def open_reader(self, location: Any, what: str, error: type[DistmergeError] = DistmergeError) -> Any:
        location = str(location)
        where = parse_remote(location)
        if where.revision:
            cached = cached_file(where, where.revision, where.key)
            if cached is not None:
                from distmerge.io.local import LOCAL

                return LOCAL.open_reader(cached, what, error)
        hub = _hub()
        url = hub.hf_hub_url(where.container, where.key, revision=where.revision, endpoint=endpoint())

        def ask() -> int:
            meta = _worded(lambda: hub.get_hf_file_metadata(url, endpoint=endpoint()), location, what, error)
            if meta.size is None:
                raise error(f"{location}: the Hub did not say how large {what} is; cannot read it by ranges")
            return int(meta.size)

        size = _SIZES.get(location, ask)

        def stream(offset: int, length: int) -> Iterator[bytes]:
            headers = {**hub.utils.build_hf_headers(), "Range": f"bytes={offset}-{offset + length - 1}"}
            with hub.utils.get_session().stream("GET", url, headers=headers, follow_redirects=True) as answer:
                hub.utils.hf_raise_for_status(answer)
                if answer.status_code != 206 and offset:
                    raise error(f"{location}: the server ignored the range request (HTTP {answer.status_code}); "
                                "distmerge reads only the rows it merges, so it needs range support")
                yield from answer.iter_bytes(STREAM_CHUNK)

        return RemoteReader(location, size, stream, transient, lambda e: error(explain(e, location, what)))


HUB = HubStorage()
