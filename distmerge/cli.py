"""Command line: ``distmerge merge | plan | calibrate | stats | verify | warm-up``.

User errors (bad config, broken inputs, unusable output) print one message and exit 2;
``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from distmerge.errors import ConfigError, DistmergeError
from distmerge.io.locations import url_scheme
from distmerge.sizes import parse_size
from distmerge.warm_up import add_warm_up_parser, run_warm_up

log = logging.getLogger("distmerge")


def _size_arg(value: str) -> int:
    try:
        return parse_size(value, "--shard-size")
    except DistmergeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ranged(kind: type, low: float, high: float, what: str):  # type: ignore[no-untyped-def]
    """An argparse type: a ``kind`` number from ``low`` to ``high`` (``what`` names the kind)."""
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not low <= number <= high:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {low:g} to {high:g}")
        return number
    return parse


_positive_int = _ranged(int, 1, 100_000, "a whole number")
_omega_arg = _ranged(float, 0.0, 1.0, "a number")


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: a destructive flag (--overwrite-foreign) must be typed in full, and a
    # flag added later must not change what an old abbreviation meant.
    parser = argparse.ArgumentParser(prog="distmerge", description="Merge large language models on Ray, shard by shard.",
                                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", allow_abbrev=False, help="merge the models of CONFIG into OUT_DIR")
    merge.add_argument("config", type=Path, help="merge config (YAML, mergekit schema)")
    merge.add_argument("out_dir", help="output directory (Hugging Face layout), or s3://bucket/prefix or gs://bucket/prefix")
    merge.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS; without one, see --executor)")
    merge.add_argument("--executor", choices=("auto", "local", "ray"),
                       help="who merges: local (threads of this process, no Ray to start), ray (Ray tasks: "
                            "the cluster at --ray-address/RAY_ADDRESS, else an embedded Ray), auto (default "
                            "from the config's execution.executor, itself auto: Ray when an address is given "
                            "or AIM calibrates in several stages, local otherwise)")
    merge.add_argument("--shard-size", type=_size_arg, help="memory budget of one work unit, e.g. 256MB (default from config)")
    merge.add_argument("--workers", type=_positive_int, help="work units in flight at once (default: CPUs of the cluster)")
    merge.add_argument("--seed", type=int, help="seed of randomized methods (DARE, DELLA)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace an earlier distmerge output in OUT_DIR (deletes only files a distmerge run "
                            "wrote; refuses if OUT_DIR holds anything else, or is, contains or is inside an input)")
    merge.add_argument("--overwrite-foreign", action="store_true",
                       help="with --overwrite: also delete files in OUT_DIR that no distmerge run wrote")
    merge.add_argument("--resume", action="store_true",
                       help="finish an interrupted merge in OUT_DIR (rerunning the same command does this too)")
    merge.add_argument("--allow-nonfinite", action="store_true",
                       help="merge inputs holding NaN/Inf with a warning instead of refusing them")
    merge.add_argument("--no-progress", action="store_true", help="no progress bars")

    plan = sub.add_parser("plan", allow_abbrev=False, help="read headers only and print what a merge would do")
    plan.add_argument("config", type=Path)
    plan.add_argument("--shard-size", type=_size_arg)

    verify = sub.add_parser("verify", allow_abbrev=False, help="check a merged checkpoint: index, headers, checksums, architecture, NaN/Inf")
    verify.add_argument("out_dir", help="a merged checkpoint's directory, or its s3:// or gs://bucket/prefix")
    verify.add_argument("--quick", action="store_true", help="headers and architecture only (no data read)")

    calibrate = sub.add_parser("calibrate", allow_abbrev=False, help="compute AIM activation statistics of the base model")
    calibrate.add_argument("config", type=Path)
    calibrate.add_argument("--out", required=True,
                           help="statistics file to write (.safetensors): a path, s3://bucket/key or gs://bucket/key")
    calibrate.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS)")
    calibrate.add_argument("--executor", choices=("auto", "local", "ray"),
                           help="local: one stage in this process; ray: Ray stage actors; auto (default: the "
                                "config's execution.executor): as merge --executor decides")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.add_argument("--plot", type=Path, help="also draw the statistics per layer into this PNG (needs matplotlib)")

    stats = sub.add_parser("stats", allow_abbrev=False, help="show what AIM statistics say: per-layer peakedness, the channels AIM protects")
    stats.add_argument("stats_file", help="statistics file written by distmerge calibrate or a merge "
                                          "(a path, s3://, gs://bucket/key or hf://org/name/path)")
    stats.add_argument("--omega", type=_omega_arg, default=0.4, help="omega the factors are shown for (default 0.4)")
    stats.add_argument("--plot", type=Path, help="also draw the statistics per layer into this PNG (needs matplotlib)")
    add_warm_up_parser(sub)
    for command in sub.choices.values():  # also after the subcommand (`merge c.yml out --debug`)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # HTTP clients log every request at INFO (one per range read of a remote input).
    for noisy in ("urllib3", "filelock", "ray", "httpx", "httpx2", "httpcore", "httpcore2", "botocore", "boto3",
                  "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_merge(args: argparse.Namespace) -> int:
    from distmerge.engine.run import run_merge

    if args.overwrite_foreign and not args.overwrite:
        raise ConfigError("--overwrite-foreign only widens --overwrite; pass both to delete files in OUT_DIR "
                          "that no distmerge run wrote")

    report = run_merge(
        args.config, args.out_dir, ray_address=args.ray_address, shard_size=args.shard_size,
        workers=args.workers, seed=args.seed, overwrite=args.overwrite, overwrite_foreign=args.overwrite_foreign,
        resume=args.resume, allow_nonfinite=True if args.allow_nonfinite else None, executor=args.executor,
        progress=not args.no_progress)
    if report.get("noop"):
        print(f"already complete: {report['out_dir']} (fingerprint {report.get('fingerprint')}); nothing to do")
    else:
        print(f"merged {report['merge_method']}: {report['tensors']} tensors, {report['bytes_written']} bytes "
              f"in {report['seconds']:.1f}s -> {report['out_dir']}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from distmerge.output.verify_stored import verify_location

    result = verify_location(args.out_dir, deep=not args.quick)
    for w in result.warnings:
        print(f"warning: {w}")
    for p in result.problems:
        print(f"problem: {p}")
    state = "OK" if result.ok else f"FAILED ({len(result.problems)} problems)"
    print(f"{args.out_dir}: {state}: {result.tensors} tensors, {result.checksums_verified} checksums verified, "
          f"{result.bytes_scanned} bytes scanned for NaN/Inf")
    return 0 if result.ok else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from distmerge.engine.request import resolve_request
    from distmerge.plan import build_plan

    request = resolve_request(args.config, shard_size=args.shard_size)
    print(build_plan(request.config, request.shard_size, needs_base=request.needs_base).summary())
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from distmerge.aim.feature import AimFeature
    from distmerge.engine.cluster import connect
    from distmerge.engine.executors import choose_executor
    from distmerge.engine.request import resolve_request
    from distmerge.output.directory import check_statistics_target

    request = resolve_request(args.config)
    aim = next((f for f in request.features if isinstance(f, AimFeature)), None)
    if aim is None:
        raise ConfigError(f"{args.config}: calibrate needs base_model and an aim: block")
    remote = None
    if url_scheme(args.out) is not None:  # written locally, then uploaded whole
        from distmerge.aim.stats_file import load_statistics
        from distmerge.output.remote_file import RemoteFileTarget

        remote = RemoteFileTarget(args.out, request.input_paths(), "an AIM statistics file", load_statistics)
        out = remote.staging
    else:
        out = Path(args.out)
        check_statistics_target(out, request.input_paths())
    if args.plot is not None:
        _check_plot(args.plot, {**request.input_paths(), "--out": out})
    # Ray where a merge would take it, else the one stage in this process (aim.in_process).
    setting = args.executor or request.config.execution.executor
    if choose_executor(setting, args.ray_address, aim.pipeline_reason()).name == "ray":
        connect(args.ray_address)
    aim.calibrate(out, progress=not args.no_progress)
    if remote is not None:
        remote.publish()
    print(f"wrote statistics of {len(aim.statistics)} modules to {args.out}")
    _show_statistics(aim.statistics, request.config.aim.omega, args.plot, str(request.config.base_model))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from distmerge.aim.feature import MAX_STATS_BYTES
    from distmerge.aim.stats_file import load_statistics
    from distmerge.io.remote_files import fetch_file

    remote = url_scheme(args.stats_file) is not None
    local = fetch_file(args.stats_file, "the statistics file", ConfigError, MAX_STATS_BYTES).path if remote \
        else Path(args.stats_file)
    if args.plot is not None:
        _check_plot(args.plot, {"stats_file": local})
    try:
        statistics, metadata = load_statistics(local)
    except ConfigError as e:  # name the file as the user gave it, not its cached copy
        raise ConfigError(str(e).replace("aim.stats: ", "", 1).replace(str(local), args.stats_file)) from None
    _show_statistics(statistics, args.omega, args.plot, metadata.get("base_model", str(args.stats_file)))
    return 0


def _check_plot(path: Path, inputs: dict[str, Path]) -> None:
    """Before any work: the plot's target is safe to write and matplotlib is there."""
    from distmerge.aim.stats_summary import require_matplotlib
    from distmerge.output.directory import check_plot_target

    check_plot_target(path, inputs)
    try:
        require_matplotlib()
    except ImportError as e:
        raise ConfigError(str(e)) from None


def _show_statistics(statistics: dict, omega: float, plot_path: Path | None, model: str) -> None:
    """Print the compact table of the statistics; draw them if asked (checked by _check_plot)."""
    from distmerge.aim.stats_summary import format_table, plot, summarize

    summary = summarize(statistics, omega)
    print(format_table(summary, omega))
    if plot_path is not None:
        plot(summary, plot_path, f"{Path(model).name}: AIM per-input-channel statistics")
        print(f"plot: {plot_path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    commands = {"merge": _cmd_merge, "plan": _cmd_plan, "calibrate": _cmd_calibrate, "verify": _cmd_verify,
                "stats": _cmd_stats, "warm-up": run_warm_up}
    try:
        return commands[args.command](args)
    except DistmergeError as e:
        if args.debug:
            raise
        print(f"distmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave that the system refuses (too long, not permitted, ...)
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"distmerge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distmerge: interrupted; rerun the same command to finish", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback is for --debug
        if args.debug:
            raise
        print(f"distmerge: internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug in distmerge, "
              "not in your input: rerun with --debug for the traceback and report it", file=sys.stderr)
        return 70


def run() -> None:
    """The ``distmerge`` command: :func:`main`, then the process ends at once.

    Why not a plain ``sys.exit``: the interpreter's teardown (every module's objects freed one by
    one: torch, numba, the plan) takes ~0.7 s after a merge whose work is done and published.
    Everything this process wrote is closed, fsynced or flushed by then (stdio and logging are
    flushed here), so it skips the teardown, unless a non-daemon thread still works. Where Ray
    runs in this process it is shut down here first, as its exit hook would (stopping the Ray
    processes it started, or leaving a joined cluster): after a calibration the teardown of
    torch, transformers and Ray's own modules took another ~2 s.
    """
    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:  # as Ray's own exit hook calls it: with its half-second for the workers' last log lines
            ray.shutdown(_exiting_interpreter=True)
        except KeyboardInterrupt:
            print("distmerge: interrupted while stopping Ray", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - the work is done; its exit code stands
            print(f"distmerge: warning: stopping Ray failed ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if busy:
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    run()
