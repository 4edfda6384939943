"""``distmerge warm-up``: after it, a merge of what it covered compiles nothing.

The end-to-end case runs in a fresh numba cache folder (``NUMBA_CACHE_DIR``), so the warm-up
must compile, and the merge after it, in another process, counts what numba compiles: any
kernel signature the warm-up missed shows up there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from distmerge.cli import main
from distmerge.errors import ConfigError
from distmerge.methods.registry import METHODS
from distmerge.testing.method_cases import method_config
from distmerge.testing.tiny import build_family
from distmerge.warm_up import WarmMerge, plan_merges

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_runs_by_default_with_the_expert_counts_it_takes():
    merges = plan_merges(sorted(METHODS), ["bfloat16"], None, [2, 3])
    assert {m.method for m in merges} == set(METHODS)
    counts = {}
    for m in merges:
        counts.setdefault(m.method, set()).add(m.experts)
    assert counts["slerp"] == counts["nearswap"] == counts["passthrough"] == counts["arcee_fusion"] == {1}
    assert counts["nuslerp"] == {2}
    assert counts["ties"] == counts["linear"] == counts["karcher"] == {2, 3}


def test_compute_dtypes_default_to_float32_and_the_storage():
    merges = plan_merges(["linear"], ["bfloat16", "float32"], None, [2])
    assert [(m.stored, m.compute) for m in merges] == [("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                                       ("float32", "float32")]
    merges = plan_merges(["ties"], ["float16"], ["float64"], [4])
    assert merges == [WarmMerge("ties", "float16", "float64", 4)]


@pytest.mark.parametrize("args, words", [
    (["--methods", "linear,tie"], "unknown method(s) tie"),
    (["--dtypes", "int8"], "--dtypes: int8 not among"),
    (["--compute-dtypes", "float8"], "--compute-dtypes: float8 not among"),
])
def test_a_wrong_name_is_refused_in_one_line(args, words, capsys):
    assert main(["warm-up", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_zero_experts_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["warm-up", "--experts", "0"])
    assert e.value.code == 2
    with pytest.raises(ConfigError):
        plan_merges(["linear"], ["float32"], None, [0])


MERGE_COUNTING_COMPILES = textwrap.dedent("""
    import sys
    from distmerge.warm_up import counting_compiles
    from distmerge.cli import main
    with counting_compiles() as compiled:
        code = main(["merge", sys.argv[1], sys.argv[2], "--executor", "local", "--no-progress"])
    print("compiled:", len(compiled), sorted(set(compiled)))
    sys.exit(code)
""")


def test_after_a_warm_up_a_merge_compiles_nothing(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    warm = subprocess.run([sys.executable, "-m", "distmerge.cli", "warm-up", "--methods", "della", "--dtypes",
                           "bfloat16", "--experts", "2", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert warm.returncode == 0, warm.stderr[-2000:]
    compiled = re.search(r"(\d+) functions compiled", warm.stdout)
    assert compiled and int(compiled.group(1)) > 0, f"a fresh cache folder was not compiled into:\n{warm.stdout}"
    assert "della" not in warm.stderr  # the merges' own logs are kept quiet
    base, experts = build_family(tmp_path / "models", n_experts=2, dtype=torch.bfloat16, num_hidden_layers=1)
    for compute in ("float32", "bfloat16"):
        config = tmp_path / f"{compute}.yml"
        config.write_text(yaml.safe_dump(method_config("della", base, experts, dtype=compute)))
        merge = subprocess.run([sys.executable, "-c", MERGE_COUNTING_COMPILES, str(config), str(tmp_path / compute)],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert merge.returncode == 0, merge.stderr[-2000:]
        assert "compiled: 0 " in merge.stdout, f"{compute} compute: the merge compiled {merge.stdout}"


def test_a_name_given_twice_runs_once():
    assert plan_merges(["ties", "ties"], ["bfloat16", "bfloat16"], ["float32", "float32"], [2, 2]) == \
        [WarmMerge("ties", "bfloat16", "float32", 2)]


def test_a_method_gets_the_count_nearest_to_the_one_asked_for():
    """model_stock takes two or more: asked for one expert, it runs with two (not one, which its
    config would refuse after minutes of other merges)."""
    assert [m.experts for m in plan_merges(["model_stock"], ["float32"], ["float32"], [1])] == [2]
    assert [m.experts for m in plan_merges(["slerp"], ["float32"], ["float32"], [3])] == [1]


def test_a_full_temporary_disk_is_a_user_error(monkeypatch, capsys):
    import distmerge.testing.tiny as tiny

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny, "build_family", full)
    assert main(["warm-up", "--no-progress", "--methods", "linear", "--dtypes", "float32"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the warm-up's tiny models" in err and "TMPDIR" in err and err.count("\n") == 1


def test_an_unusable_numba_cache_dir_is_refused(tmp_path):
    """numba would silently cache into the package instead of the folder the user named."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    proc = subprocess.run([sys.executable, "-m", "distmerge.cli", "warm-up", "--no-progress", "--methods", "linear"],
                          capture_output=True, text=True, env={**os.environ, "NUMBA_CACHE_DIR": str(not_a_folder)},
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"NUMBA_CACHE_DIR={not_a_folder}: not a folder numba can write to" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_sigterm_removes_the_temporary_models(tmp_path):
    """``timeout``, ``docker stop`` and Kubernetes send SIGTERM: the warm-up's temporary folder
    goes all the same.

    The signal comes from inside the warm-up, at its first merge, when the tiny models are
    on disk: a test that waits for a file and then signals from outside races the warm-up's
    own end on a loaded machine (it once signalled a process that had just finished, rc 0)."""
    import signal

    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "TMPDIR": str(private_tmp)}
    driver = textwrap.dedent("""
        import os, signal, sys, time
        from pathlib import Path

        import distmerge.warm_up as warm_up

        def terminated(merge, base, experts, tmp):
            print("models:", len(list(Path(tmp).glob("*/expert*/*.safetensors"))), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the handler's exception ends this sleep

        warm_up._run = terminated
        sys.argv = ["distmerge", "warm-up", "--no-progress", "--methods", "della", "--dtypes", "float32"]
        from distmerge.cli import run
        run()
    """)
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    made = re.search(r"models: (\d+)", proc.stdout)
    assert made and int(made[1]) > 0, proc.stdout  # signalled while the temporary models were there
    assert not list(private_tmp.glob("distmerge-warm-up-*"))
