"""The numba cache guard: numba keys a cached kernel on its own file, so a kernel whose
compiled-in helpers changed in another file would load old machine code. These check that the
guard fingerprints every file with compiled code and clears a cache folder whose recorded
fingerprint differs, and only then; and, end to end in a fresh process, that a helper changed
in another file reaches the kernel that uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from distmerge import numba_cache


def test_every_file_with_compiled_code_is_fingerprinted():
    compiled = {p for p in numba_cache.PACKAGE.rglob("*.py")
                if re.search(r"^(import numba|from numba)", p.read_text(), re.M) and p.name != "numba_cache.py"}
    assert compiled <= set(numba_cache.compiled_files()), sorted(compiled - set(numba_cache.compiled_files()))


def test_fingerprint_changes_with_any_file(tmp_path):
    files = numba_cache.compiled_files()
    assert numba_cache.fingerprint(files) == numba_cache.fingerprint(files)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    first = numba_cache.fingerprint([a, b], tmp_path)
    b.write_text("y = 3\n")
    assert numba_cache.fingerprint([a, b], tmp_path) != first


def test_a_folder_with_another_fingerprint_is_cleared_and_stamped(tmp_path):
    folder = tmp_path / "__pycache__"
    folder.mkdir()
    kept = [folder / "module.cpython-311.pyc", folder / "notes.txt"]
    cached = [folder / "loops.kernel-12.py311.nbi", folder / "loops.kernel-12.py311.1.nbc"]
    for p in kept + cached:
        p.write_bytes(b"x")
    (folder / numba_cache.STAMP).write_text("old")
    missing = tmp_path / "absent"
    assert numba_cache.drop_stale({folder, missing}, "new") == [folder]
    assert all(p.exists() for p in kept) and not any(p.exists() for p in cached)
    assert (folder / numba_cache.STAMP).read_text() == "new"
    assert not missing.exists()
    for p in cached:  # recompiled under the new fingerprint: left alone from then on
        p.write_bytes(b"y")
    assert numba_cache.drop_stale({folder}, "new") == []
    assert all(p.exists() for p in cached)


def test_a_folder_without_a_fingerprint_is_cleared(tmp_path):
    """A cache from before the guard existed has no record: it cannot be trusted."""
    (tmp_path / "k.f-1.py311.nbi").write_bytes(b"x")
    assert numba_cache.drop_stale({tmp_path}, "new") == [tmp_path]
    assert not (tmp_path / "k.f-1.py311.nbi").exists()


def test_distmerges_cache_folders_include_the_source_folders():
    files = numba_cache.compiled_files()
    dirs = numba_cache.cache_dirs(files)
    assert {f.parent / "__pycache__" for f in files} <= dirs


HELPER = "from distmerge.numba_cache import inline\n\n@inline\ndef helper(x):\n    return x + {value}\n"
KERNEL = textwrap.dedent("""
    from distmerge.numba_cache import jit
    from probe_pkg.helper import helper

    @jit
    def kernel(x):
        return helper(x)
""")


def test_a_changed_helper_reaches_the_kernel_that_inlines_it(tmp_path, monkeypatch):
    """numba alone would load the kernel cached with the old helper (its own file is
    unchanged); with the helper's file among the fingerprinted ones, the cache is dropped."""
    package = tmp_path / "probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kernel.py").write_text(KERNEL)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from distmerge import numba_cache
        files = sorted(Path({str(package)!r}).glob("*.py"))
        numba_cache.drop_stale({{Path({str(package)!r}) / "__pycache__"}}, numba_cache.fingerprint(files, Path({str(package)!r})))
        sys.path.insert(0, {str(tmp_path)!r})
        from probe_pkg.kernel import kernel
        print(kernel(1))
    """)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    outputs = []
    for value in (10, 20):
        (package / "helper.py").write_text(HELPER.format(value=value))
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(int(proc.stdout.split()[-1]))
    assert outputs == [11, 21]


COUNT_COMPILES = textwrap.dedent("""
    import numpy as np
    from distmerge.warm_up import counting_compiles

    with counting_compiles() as compiled:
        from distmerge.methods import kernels
        a = np.ones(64, dtype=np.float32)
        kernels.weighted_sum([a, a], np.ones(2, dtype=np.float32), np.float32(1))
    print(len(compiled))
""")


def test_a_fresh_cache_folder_keeps_what_the_first_process_compiled(tmp_path):
    """numba creates its cache folder on the first compile, after the guard ran; the guard must
    not then take the stampless folder for an old cache and clear it in the next process (every
    kernel compiled twice, under NUMBA_CACHE_DIR or numba's user-wide cache)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    counts = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", COUNT_COMPILES], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts.append(int(proc.stdout.split()[-1]))
    assert counts[0] > 0, "the first process found the kernel cached: the test proves nothing"
    assert counts[1] == 0, f"the second process compiled {counts[1]} distmerge functions again"
