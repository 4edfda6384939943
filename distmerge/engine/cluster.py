"""Connecting to Ray: an embedded local Ray by default, or the cluster the user names.

- no address and no ``RAY_ADDRESS``: start a local Ray sized to this machine (laptop mode),
  every one of its sockets on loopback;
- ``--ray-address`` or ``RAY_ADDRESS`` (set by ``ray job submit`` inside a job): join it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from distmerge.errors import ConfigError

log = logging.getLogger(__name__)

#: The address the embedded Ray takes as its node address, so that it listens on loopback only.
LOOPBACK = "127.0.0.1"
# Ray's own switch between "this node may join a cluster" (Linux default: the node address is
# the host's routable one) and "local only" (the macOS and Windows default: the node address
# is loopback). Ray reads it into ``ray_constants.ENABLE_RAY_CLUSTER`` when it is imported.
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: What the embedded Ray's workers run with: no tokenizers thread pool in the calibration's
#: stage actors and data workers (forked Ray processes and its threads do not mix).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a run joins: ``address`` (``--ray-address``), else ``RAY_ADDRESS`` (which
    ``ray job submit`` sets inside a job), else None (the embedded Ray, or no Ray at all)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray if needed; returns True when this call started or joined it.

    Joining (``address`` or ``RAY_ADDRESS``): ``ray.init(address=...)`` as given; the cluster's
    own settings decide what it binds, distmerge changes nothing there.

    Embedded (neither): a fresh local Ray (``address="local"``, so a ``ray start`` cluster
    that happens to run here is never joined by accident) whose node address is loopback. Every
    Ray process binds its listeners from the node address, so all of them end up on
    127.0.0.1 (``::1`` on a host whose ``localhost`` is IPv6) instead of every interface:

    - GCS server (gRPC) and raylet (node manager and object manager, gRPC);
    - the driver's and every worker's core-worker gRPC server;
    - dashboard agent: HTTP (jobs API and ``/logs``, port 52365), gRPC, and the Prometheus
      metrics export endpoint;
    - runtime-env agent (HTTP; installs packages on request);
    - the dashboard process (started even with ``include_dashboard=False``, for usage stats)
      and the autoscaler monitor, each with its Prometheus endpoint (44227, 44217);
    - no dashboard UI/API (``include_dashboard=False``), no Ray Client server; the log
      monitor and the reaper open no sockets.

    None of these needs another host: the embedded Ray is one node, and the default Linux
    node address (the host's routable one) would leave the unauthenticated endpoints above
    open to the network, some of them (jobs API, runtime-env agent) able to run code.
    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: on Linux Ray swaps a
    loopback node address for the routable one unless Ray's cluster mode is off, which
    ``_loopback_node`` arranges for the duration of the start. Usage-stats reporting (an HTTPS
    call to usage-stats.ray.io from the dashboard process) is switched off too.
    """
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and
        # Ray refuses to start a driver whose runtime env clashes with it.
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        except ConnectionError as e:  # Ray's words name its own --address flag; say it as ours
            why = ("no Ray cluster runs on this machine (auto joins one that `ray start` started here)"
                   if address == "auto" else f"Ray could not join it ({' '.join(str(e).split())[:300]})")
            raise ConfigError(f"Ray cluster at {address} (--ray-address or RAY_ADDRESS): {why}; start it with "
                              "`ray start --head` or give the head's address") from None
        log.info("joined Ray cluster at %s", address)
    else:
        import psutil

        cpus = num_cpus or os.cpu_count() or 1
        # Workers write results to files, so the object store carries only small payloads.
        store = int(min(2 * 1024**3, max(100 * 1024**2, psutil.virtual_memory().available * 0.05)))
        log.info("starting an embedded local Ray (%d CPUs, %d MB object store) on %s",
                 cpus, store // 2**20, LOOPBACK)
        # No usage report to usage-stats.ray.io. ray.init sets this too, except on nightly
        # wheels; say it outright. It stays set, as Ray itself leaves it.
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        with _loopback_node(), _inherited_env(WORKER_ENV):
            ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=cpus,
                     object_store_memory=store, include_dashboard=False, dashboard_host=LOOPBACK,
                     log_to_driver=True, configure_logging=False)
    return True


#: Seconds to wait for a named cluster's head, for the TCP connection and again for the gRPC
#: answer, before saying it is not there.
REACH_TIMEOUT_S = 10.0


def check_reachable(address: str) -> None:
    """Refuse, in one line, an address that is not a Ray cluster's (``host:port``,
    ``ray://host:port``, ``auto`` or ``local``), a ``host:port`` nobody answers on, one where
    something other than a Ray head's GCS answers, or a head that refuses this process's token.

    Why: ``ray.init`` retries an unreachable GCS without end (a mistyped ``--ray-address`` or a
    stale ``RAY_ADDRESS`` hung the command for minutes, printing only Ray's warnings), and
    raises a bare ValueError for a form it cannot parse (a host without its port, the
    dashboard's ``http://`` address that ``ray job submit`` takes).
    """
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in target \
            or address != address.strip():
        dashboard = " (http:// is the dashboard's address, for ray job submit)" if "://" in target else ""
        raise ConfigError(f"Ray cluster address {address!r} (--ray-address or RAY_ADDRESS): not a Ray address"
                          f"{dashboard}; give the head's host:port (e.g. 127.0.0.1:6379), ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"Ray cluster at {address} (--ray-address or RAY_ADDRESS): nothing answers there "
                          f"({e.strerror or e}); start it with `ray start --head` or give the head's address") from None
    refusal = _gcs_refusal(target, client=address.startswith("ray://"))
    if refusal:
        raise ConfigError(f"Ray cluster at {address} (--ray-address or RAY_ADDRESS): {refusal}")


#: The advice when a Ray head refuses this process's auth token (Ray's token authentication).
TOKEN_HELP = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the head's token, as "
              "`ray start --head` was given it (https://docs.ray.io/en/latest/ray-security/token-auth.html)")


def _gcs_refusal(target: str, client: bool) -> str | None:
    """Why joining what answers on ``target`` cannot work, or None if it may. ``client``: a
    ``ray://`` address, the Ray Client server's, which speaks gRPC but not the GCS's service
    (only a server that speaks no gRPC at all is refused there).

    Why: ``ray.init`` given a port where another service listens (a proxy, the dashboard's HTTP
    port, a listener that closes at once) waits 25 s under Ray's C++ warnings or hangs for
    good, and a head that refuses this process's auth token fails after 20 s naming neither the
    token nor the address given. One gRPC call of the GCS's own service, carrying the token Ray
    would send, settles it in milliseconds: a GCS answers it, or refuses the token; anything
    else fails to speak gRPC or lacks the service.
    """
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without these modules: ray.init finds out itself
        return None
    token = _ray_token_metadata()
    with grpc.insecure_channel(target) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=REACH_TIMEOUT_S, metadata=token or ())
        except grpc.RpcError as e:
            code = e.code()
            if client and code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            if code == grpc.StatusCode.UNAUTHENTICATED and token is not None:  # None: Ray's token unknown here
                has = "the token this process has is not its" if token else "this process has none"
                return f"the head asks for its auth token and {has}; {TOKEN_HELP}"
            why = {grpc.StatusCode.UNAVAILABLE: "it does not speak gRPC: an HTTP server, a proxy or another service?",
                   grpc.StatusCode.DEADLINE_EXCEEDED: f"no gRPC answer within {REACH_TIMEOUT_S:.0f} s",
                   grpc.StatusCode.UNIMPLEMENTED: "a gRPC server without Ray's GCS service"}.get(code)
            if why and client:
                return (f"something answers there but it is not a Ray Client server ({why}); give ray://host:port "
                        "of the head's client server (port 10001 unless --ray-client-server-port was given)")
            if why:
                return (f"something answers there but it is not a Ray head ({why}); give the head's GCS address, "
                        "the host:port `ray start --head` prints (port 6379 unless --port was given)")
    return None


def _ray_token_metadata() -> tuple[tuple[str, str], ...] | None:
    """The auth header Ray's own client would send (from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token, by Ray's loader), ``()`` if it has no token, None where this Ray has no
    such loader (then only ``ray.init`` can tell whether the head takes this process)."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if not loader.has_token(ignore_auth_mode=True):
            return ()
        return tuple(loader.get_token_for_http_header().items())
    except (ImportError, AttributeError, TypeError, RuntimeError):  # another Ray's internals
        return None


@contextlib.contextmanager
def _inherited_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` while the embedded Ray starts, so its processes and every worker inherit it.

    Why not ``runtime_env={"env_vars": ...}``: a task or actor with a runtime env of its own
    cannot use the idle workers the raylet starts in advance, so each first task and each stage
    actor waited for a fresh worker process (measured: +1.1 s for the first task, +0.5 s for
    two actors). A value the user has set already is kept. This process's own environment is
    restored afterwards.
    """
    saved = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Turn Ray's cluster mode off while the embedded Ray starts, so its node address is loopback.

    ``ray.init`` passes ``_node_ip_address`` through ``resolve_ip_for_localhost``, which in
    cluster mode (the Linux default) replaces a loopback address with the host's routable one,
    and every Ray process then listens on that address or on all interfaces. Cluster mode off
    (what macOS and Windows run by default) keeps loopback. Both places Ray reads it are set:
    this interpreter's already imported ``ray_constants`` (read at call time by
    ``get_node_ip_address``), and the environment the Ray processes started during ``ray.init``
    inherit (raylet passes it on to the agents and workers it starts later), so that no Ray
    process derives a routable address on its own. Both are restored afterwards: a later
    ``ray.init(address=...)`` in this process, or anything else it starts, is unaffected.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_RAY_CLUSTER_ENV)
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = saved_env


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
