"""``distmerge warm-up``: compile the merge kernels into numba's on-disk cache before a merge needs them.

Why: distmerge's merge loops are numba kernels, compiled on first use and cached on disk, one
machine-code version per kernel, argument types and CPU. Argument types include the stored
dtype, the compute dtype and the number of models. A merge that meets an uncached combination
compiles it first: seconds per kernel, minutes for a method family's first merge. On Kubernetes
every pod starts from its image, so a scheduled merge pays that on every run unless the image
carries the cache. A ``kernels.warm_up()`` call compiled the task-vector family only.

This runs the real merges on tiny models (a one-layer Llama base and experts built here, in a
temporary folder), for every method, in each stored dtype and compute dtype asked for and each
number of experts. So what gets cached is what a merge calls, not a hand-kept list of
signatures. The merges run on the local executor (this process), which compiles the same
kernels as Ray workers do; the workers load them from the same cache. AIM's relaxation kernel
and the LoRA rows' product are compiled as well.

numba keys its cache on the CPU model (its codegen's name and features). An image built on a
CI runner of another model misses on the cluster's nodes. ``NUMBA_CPU_NAME`` and
``NUMBA_CPU_FEATURES``, set alike at build and at run time, fix that key: see cluster/README.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from distmerge.errors import ConfigError, OutputError

log = logging.getLogger(__name__)

STORED_DTYPES = ("bfloat16", "float16", "float32")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "float64")
DEFAULT_COMPUTE = "float32"  # what a config without ``dtype:`` computes most methods in


@dataclass(frozen=True)
class WarmMerge:
    """One tiny merge of the warm-up: ``method`` over ``experts`` models stored in ``stored``,
    computed in ``compute``."""

    method: str
    stored: str
    compute: str
    experts: int


@dataclass(frozen=True)
class WarmUpReport:
    """What :func:`warm_up` did: the merges run, the functions numba compiled (0 when the cache
    was already warm), the seconds taken, and where the cache is and for which CPU."""

    merges: int
    compiled: int
    seconds: float
    cache_dirs: tuple[Path, ...]
    cpu: str

    def summary(self) -> str:
        state = ("the cache was already warm" if self.compiled == 0
                 else f"{self.compiled} functions compiled into the cache")
        where = ", ".join(str(d) for d in self.cache_dirs)
        merges = f"{self.merges} merge{'s' if self.merges != 1 else ''}"
        return (f"warm-up: {merges} in {self.seconds:.1f}s; {state}\n"
                f"kernel cache: {where}\nCPU the cache is keyed to: {self.cpu}")


def plan_merges(methods: Sequence[str], stored: Sequence[str], compute: Sequence[str] | None,
                experts: Sequence[int]) -> list[WarmMerge]:
    """The merges to run. Without ``compute``, each stored dtype runs with ``dtype: float32``
    (a config without ``dtype:``; mergekit's methods that keep the stored dtype then compute in
    it, and so do distmerge's) and with ``dtype:`` equal to the storage, as most mergekit configs
    set it. Each method runs with each number of ``experts`` it takes, else with the
    nearest it takes (slerp with one, nuslerp with two)."""
    from distmerge.methods.registry import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(METHODS))}")
    for name, given, known in (("--dtypes", stored, STORED_DTYPES), ("--compute-dtypes", compute or (), COMPUTE_DTYPES)):
        bad = [d for d in given if d not in known]
        if bad:
            raise ConfigError(f"{name}: {', '.join(bad)} not among {', '.join(known)}")
    if any(n < 1 for n in experts):
        raise ConfigError(f"--experts: numbers of experts are 1 or more, not {min(experts)}")
    methods, stored, compute = list(dict.fromkeys(methods)), list(dict.fromkeys(stored)), list(dict.fromkeys(compute or ()))
    merges = []
    for method in methods:
        least = METHODS[method].min_experts
        most = METHODS[method].max_experts or max(*experts, least)
        counts = sorted({min(max(n, least), most) for n in experts})
        for s in stored:
            for c in (compute or tuple(dict.fromkeys((DEFAULT_COMPUTE, s)))):
                merges += [WarmMerge(method, s, c, n) for n in counts]
    return merges


@contextmanager
def counting_compiles() -> Iterator[list[str]]:
    """A list that collects the name of every distmerge function numba compiles (not loads from
    its cache) while the block runs."""
    from numba.core import event

    compiled: list[str] = []

    class Compiles(event.Listener):
        def on_start(self, e: event.Event) -> None:
            fn = e.data["dispatcher"].py_func
            if fn.__module__.startswith("distmerge"):
                compiled.append(f"{fn.__module__}.{fn.__qualname__}")

        def on_end(self, e: event.Event) -> None:
            pass

    with event.install_listener("numba:compile", Compiles()):
        yield compiled


def warm_up(methods: Sequence[str], stored: Sequence[str] = STORED_DTYPES, compute: Sequence[str] | None = None,
            experts: Sequence[int] = (2, 3), progress: bool = True) -> WarmUpReport:
    """Run :func:`plan_merges`' merges (and AIM's and LoRA's kernels once), so that numba's cache
    holds every kernel they call."""
    from tqdm import tqdm

    from distmerge.numba_cache import compiled_files, used_cache_dirs

    merges = plan_merges(methods, stored, compute, experts)
    cache_dirs = tuple(sorted(used_cache_dirs(compiled_files())))
    _check_cache_dir(cache_dirs)
    started = time.perf_counter()
    quiet = logging.getLogger("distmerge")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # a hundred merges' plans and reports are not what this is for
    try:
        with _stopped_by_signals(), counting_compiles() as compiled, \
                tempfile.TemporaryDirectory(prefix="distmerge-warm-up-") as tmp:
            _warm_other_kernels()
            families: dict[str, tuple[Path, list[Path]]] = {}
            most = max(m.experts for m in merges)
            for merge in tqdm(merges, desc="warm-up", unit="merge", disable=not progress):
                if merge.stored not in families:
                    families[merge.stored] = _family(Path(tmp) / merge.stored, merge.stored, most)
                _run(merge, *families[merge.stored], Path(tmp))
            count = len(compiled)
    finally:
        quiet.setLevel(level)
    return WarmUpReport(len(merges), count, time.perf_counter() - started, cache_dirs, _cpu_key())


def _check_cache_dir(used: tuple[Path, ...]) -> None:
    """Refuse an unusable ``NUMBA_CACHE_DIR``: numba would silently cache into the package's own
    folders instead, and the cache the user asked to fill would stay empty."""
    from numba.core import config

    if not config.CACHE_DIR:
        return
    wanted = Path(config.CACHE_DIR).resolve()
    astray = [d for d in used if not d.resolve().is_relative_to(wanted)]
    if astray:
        raise ConfigError(f"NUMBA_CACHE_DIR={config.CACHE_DIR}: not a folder numba can write to (numba would cache "
                          f"into {astray[0]} instead); point it at a writable folder or unset it")


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (``timeout``, ``docker stop``, Kubernetes) end the warm-up as Ctrl-C
    does: by an exception, so the temporary models are removed on the way out."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _family(root: Path, stored: str, experts: int) -> tuple[Path, list[Path]]:
    """A one-layer tiny Llama base and ``experts`` experts stored in ``stored``."""
    import torch
    from safetensors import SafetensorError
    from transformers.utils import logging as transformers_logging

    from distmerge.testing.tiny import build_family

    transformers_logging.disable_progress_bar()
    try:
        return build_family(root, n_experts=max(experts, 2), dtype=getattr(torch, stored), num_hidden_layers=1)
    except (OSError, SafetensorError) as e:  # a full or failing temporary disk (safetensors says so its own way)
        raise OutputError(f"{root}: cannot write the warm-up's tiny models ({type(e).__name__}: {e}); free space "
                          "there or point TMPDIR at another folder") from e


def _run(merge: WarmMerge, base: Path, experts: list[Path], tmp: Path) -> None:
    from distmerge.engine.run import run_merge
    from distmerge.testing.method_cases import method_config

    name = f"{merge.method}-{merge.stored}-{merge.compute}-{merge.experts}"
    config = method_config(merge.method, base, experts[:merge.experts], dtype=merge.compute,
                           execution={"executor": "local"})
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_merge(path, tmp / name, executor="local", progress=False)


def _warm_other_kernels() -> None:
    """The kernels no plain merge of the tiny models calls: AIM's relaxation and LoRA's product."""
    import torch

    from distmerge.aim import relax_kernel
    from distmerge.lora.rows import fma_product

    relax_kernel.warm_up()
    fma_product(torch.zeros(2, 2), torch.zeros(2, 2))


def _cpu_key() -> str:
    """The CPU name and features numba compiles for, and whether they were pinned."""
    import llvmlite.binding as llvm
    from numba.core import config

    if config.CPU_NAME is None:
        return (f"{llvm.get_host_cpu_name()} (this machine's; a node of another CPU model compiles again: "
                "set NUMBA_CPU_NAME and NUMBA_CPU_FEATURES alike here and there to share the cache)")
    features = config.CPU_FEATURES or "(the name's own)"
    return f"{config.CPU_NAME} with features {features} (NUMBA_CPU_NAME)"


def add_warm_up_parser(sub: argparse._SubParsersAction) -> None:
    """The ``warm-up`` subcommand's arguments."""
    warm = sub.add_parser("warm-up", allow_abbrev=False,
                          help="compile the merge kernels into numba's on-disk cache (for images and new nodes)")
    warm.add_argument("--methods", type=_names, help="comma-separated methods (default: all)")
    warm.add_argument("--dtypes", type=_names, default=list(STORED_DTYPES),
                      help="stored dtypes of the models to merge (default: bfloat16,float16,float32)")
    warm.add_argument("--compute-dtypes", type=_names,
                      help="compute dtypes (config dtype:) for every stored dtype (default: float32, and the "
                           "stored dtype itself)")
    warm.add_argument("--experts", type=_counts, default=[2, 3],
                      help="numbers of experts merged (each compiles apart; default: 2,3)")
    warm.add_argument("--no-progress", action="store_true")


def run_warm_up(args: argparse.Namespace) -> int:
    """``distmerge warm-up``: :func:`warm_up` with the command line's choices, and its summary."""
    from distmerge.methods.registry import METHODS

    report = warm_up(args.methods or sorted(METHODS), args.dtypes, args.compute_dtypes, args.experts,
                     progress=not args.no_progress)
    print(report.summary())
    return 0


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more names, comma-separated")
    return names


def _counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in _names(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give whole numbers, comma-separated") from None
    if not all(1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"{value}: give numbers of experts from 1 to 64")
    return counts
