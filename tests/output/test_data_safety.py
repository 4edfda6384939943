"""Data safety under careless flags and hostile model folders (issue #12).

Every case asserts the exit code, the message (which file, key or tensor, and why), and that
every input folder is byte-identical afterwards: nothing outside OUT is deleted, changed or
copied out, and nothing hangs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import yaml

from distmerge.cli import main
from tests.helpers import make_config

pytestmark = pytest.mark.usefixtures("ray_local")
INDEX = "model.safetensors.index.json"
SECRET = "TOP-SECRET-9f1c: not model data"


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry below ``roots``: kind, mode, link target or content hash (links not followed)."""
    found: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    found[str(path)] = ("link", os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    found[str(path)] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
                else:
                    found[str(path)] = ("other", st.st_mode)
    return found


# The input folders of the running test: every CLI call asserts they are byte-identical after it.
WATCHED: list[Path] = []


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    before = snapshot(*WATCHED)
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert snapshot(*WATCHED) == before, f"an input changed during {args}"
    return code, captured.out + captured.err


@pytest.fixture
def family(llama_family, tmp_path):
    """Private copies of the tiny base and experts under tmp_path/models, a config file beside them."""
    base, experts = llama_family
    models = tmp_path / "models"
    copies = [Path(shutil.copytree(p, models / p.name)) for p in (base, *experts)]
    cfg = make_config("task_arithmetic", copies[0], copies[1:], [0.6, 0.3])
    config_file = tmp_path / "merge.yml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True)))
    WATCHED[:] = [models]
    yield tmp_path, copies, config_file
    WATCHED.clear()


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def config_data(config_file: Path) -> dict:
    return yaml.safe_load(config_file.read_text())


# --- 1. never touch what is not ours ----------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("where", ["models", "base", "inside_base", "expert", "config_dir"])
def test_output_never_at_or_around_an_input(family, capsys, where, overwrite):
    root, (base, *experts), config_file = family
    out = {"models": root / "models", "base": base, "inside_base": base / "merged", "expert": experts[1],
           "config_dir": root}[where]
    before = snapshot(root)
    code, text = run_cli(["merge", config_file, out, "--no-progress", *(["--overwrite"] if overwrite else [])], capsys)
    assert code == 2, text
    relation = {"models": "contains", "config_dir": "contains", "inside_base": "is inside"}.get(where, "is")
    assert f"the output directory {relation}" in text and "refused" in text
    assert snapshot(root) == before


def test_output_reached_through_a_link_to_an_input(family, capsys):
    root, (base, *_), config_file = family
    link = root / "out-link"
    link.symlink_to(base, target_is_directory=True)
    before = snapshot(root)
    code, text = run_cli(["merge", config_file, link, "--overwrite", "--overwrite-foreign", "--no-progress"], capsys)
    assert code == 2 and "the output directory is base_model" in text
    assert snapshot(root) == before


@pytest.mark.parametrize("role", ["tokenizer_source", "aim.stats", "aim.calibration.dataset"])
def test_output_around_other_inputs_is_refused(family, capsys, role):
    root, (base, *experts), config_file = family
    data = config_data(config_file)
    extra = root / "extra"
    extra.mkdir()
    if role == "tokenizer_source":
        data["tokenizer_source"] = str(shutil.copytree(base, extra / "tok"))
    elif role == "aim.stats":
        (extra / "stats.safetensors").write_bytes(b"x")
        data["aim"] = {"stats": str(extra / "stats.safetensors")}
    else:
        (extra / "calib.txt").write_text("hello world\n\nsecond document\n")
        data["aim"] = {"calibration": {"dataset": str(extra / "calib.txt")}}
    cfg = write_config(root / "other.yml", data)
    before = snapshot(root)
    code, text = run_cli(["merge", cfg, extra, "--overwrite", "--no-progress"], capsys)
    assert code == 2, text
    assert f"contains {role}" in text or ("does not exist" in text and role == "aim.stats")
    assert snapshot(root) == before


def test_overwrite_deletes_only_what_distmerge_wrote(family, capsys):
    root, _, config_file = family
    out = root / "out"
    assert run_cli(["merge", config_file, out, "--no-progress"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    elsewhere = root / "keep"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_bytes(b"precious")
    (out / "link-to-keep").symlink_to(elsewhere, target_is_directory=True)
    inputs_before = snapshot(root / "models", elsewhere)
    out_before = snapshot(out)
    code, text = run_cli(["merge", config_file, out, "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "files no distmerge run wrote (link-to-keep, notes.txt)" in text
    assert snapshot(out) == out_before  # refused before deleting anything
    code, text = run_cli(["merge", config_file, out, "--overwrite-foreign", "--no-progress"], capsys)
    assert code == 2 and "only widens --overwrite" in text
    code, text = run_cli(["merge", config_file, out, "--overwrite", "--overwrite-foreign", "--no-progress"], capsys)
    assert code == 0, text
    assert not (out / "notes.txt").exists() and not (out / "link-to-keep").exists()
    assert snapshot(root / "models", elsewhere) == inputs_before  # the link's target survived
    # A plain --overwrite of an output that holds only distmerge's files goes through.
    code, text = run_cli(["merge", config_file, out, "--overwrite", "--no-progress"], capsys)
    assert code == 0, text
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("flag", ["--overwrite-fo", "--overwr", "--no-progres"])
def test_abbreviated_flags_are_refused(family, capsys, flag):
    """A destructive flag must be typed in full: argparse's prefix matching is off."""
    root, _, config_file = family
    out = root / "out"
    assert run_cli(["merge", config_file, out, "--no-progress"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(SystemExit) as exc:
        run_cli(["merge", config_file, out, "--overwrite", flag], capsys)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert snapshot(out) == before


def test_directory_of_someone_else_is_never_cleared(family, capsys):
    root, _, config_file = family
    out = root / "theirs"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"somebody's model")
    before = snapshot(out)
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 2 and "holds no distmerge journal" in text
    code, text = run_cli(["merge", config_file, out, "--overwrite", "--no-progress"], capsys)
    assert code == 2 and "files no distmerge run wrote (model.safetensors)" in text
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json", "chat_template.jinja",
                                  "tokenizer_config.json"])
def test_side_file_linking_outside_is_not_copied(family, capsys, name):
    root, (base, *_), config_file = family
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    (base / name).unlink(missing_ok=True)
    (base / name).symlink_to(secret)
    before = snapshot(root / "models")
    out = root / "out"
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 0, text
    assert not (out / name).exists()
    assert all(SECRET.encode() not in p.read_bytes() for p in out.iterdir() if p.is_file())
    report = json.loads((out / "merge_report.json").read_text())
    assert any(s.startswith(f"{name}: a link to a location outside") for s in report["skipped_side_files"])
    assert snapshot(root / "models") == before
    assert main(["verify", str(out)]) == 0


def test_side_file_that_is_a_fifo_is_skipped_not_waited_for(family, capsys):
    root, (base, *_), config_file = family
    (base / "special_tokens_map.json").unlink(missing_ok=True)
    os.mkfifo(base / "special_tokens_map.json")
    out = root / "out"
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 0, text
    report = json.loads((out / "merge_report.json").read_text())
    assert any("FIFO" in s for s in report["skipped_side_files"])
    assert not (out / "special_tokens_map.json").exists()


def test_tokenizer_inside_the_folder_through_a_link_is_copied(family, capsys):
    """Links that stay in the model folder (or an HF cache's blobs) are fine: caches are made of them."""
    root, (base, *_), config_file = family
    (base / "tokenizer.json").rename(base / "blob-tokenizer")
    (base / "tokenizer.json").symlink_to("blob-tokenizer")
    out = root / "out"
    assert run_cli(["merge", config_file, out, "--no-progress"], capsys)[0] == 0
    assert (out / "tokenizer.json").read_bytes() == (base / "blob-tokenizer").read_bytes()


def test_weights_linking_outside_the_folder_are_refused(family, capsys):
    root, (base, *experts), config_file = family
    shard = sorted(experts[0].glob("model-*.safetensors"))[0]
    outside = root / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and shard.name in text and "outside the model folder" in text


def test_index_pointing_outside_is_refused_without_echoing_bytes(family, capsys):
    root, (base, *experts), config_file = family
    secret = root / "secret.bin"
    secret.write_bytes(SECRET.encode())
    index = json.loads((experts[0] / INDEX).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../../secret.bin"
    (experts[0] / INDEX).write_text(json.dumps(index))
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and "outside the model folder" in text and name in text
    assert str(int.from_bytes(SECRET.encode()[:8], "little")) not in text and "SECRET" not in text


# --- 4. bounded work on any input ---------------------------------------------------------------

def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("num_hidden_layers", 1_000_000_000, "num_hidden_layers is 1000000000, more than the"),
    ("num_hidden_layers", 9, "num_hidden_layers is 9 but the weights hold layers 0..3"),
    ("vocab_size", 10**12, "vocab_size is 1000000000000, more than the largest dimension"),
    ("intermediate_size", 10**9, "intermediate_size is 1000000000"),
    ("num_attention_heads", "four", "num_attention_heads is 'four', expected a non-negative integer"),
    ("max_position_embeddings", 10**15, "max_position_embeddings is 1000000000000000"),
    ("text_config", [1, 2], "text_config is a list, expected an object"),
])
def test_config_json_values_are_checked_against_the_tensors(family, capsys, key, value, message):
    root, (base, *_), config_file = family
    _edit_config(base, **{key: value})
    before = snapshot(root)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and message in text and str(base / "config.json") in text, text
    assert snapshot(root) == before


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2, 3]", "expected a JSON object of settings, got an array"),
    ("[" * 100_000 + "]" * 100_000, "arrays and objects in 200000 bytes is not the shape"),
    ('{"pad": "' + " " * 100_000 + '", "a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"a": ' * 200 + "1" + "}" * 200, "nested more than 64 levels"),
    ('{"num_hidden_layers": 4', "not valid JSON"),
])
def test_config_json_structure_is_bounded(family, capsys, content, message):
    _, (base, *_), config_file = family
    (base / "config.json").write_text(content)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and message in text and "config.json" in text, text


def test_verify_refuses_an_output_config_that_would_build_a_billion_layers(family, capsys):
    root, _, config_file = family
    out = root / "out"
    assert run_cli(["merge", config_file, out, "--no-progress"], capsys)[0] == 0
    _edit_config(out, num_hidden_layers=1_000_000_000)
    code, text = run_cli(["verify", out, "--quick"], capsys)
    assert code == 1 and "num_hidden_layers is 1000000000" in text


def _header_file(folder: Path, header: bytes) -> Path:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    return shard


@pytest.mark.parametrize(("header", "message"), [
    (b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype of JSON type list"),
    (b'{"w": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype of JSON type dict"),
    (b"[" * 50_000 + b"]" * 50_000, "arrays and objects in 100000 bytes is not the shape"),
    (b'{"pad": "' + b" " * 100_000 + b'", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    (b'{"__metadata__": {"a": [1]}}', "__metadata__ is not an object of strings"),
    (b'{"w": {"dtype": "F32", "shape": [10000000000000000000000], "data_offsets": [0, 4]}}',
     "is not a list of at most 8 non-negative integers"),
    (b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}', "data_offsets [0, 4] span 4 bytes"),
])
def test_hostile_safetensors_headers_are_messages(family, capsys, header, message):
    _, (base, *experts), config_file = family
    shard = _header_file(experts[0], header)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and message in text and shard.name in text, text


@pytest.mark.parametrize(("weight_map", "message"), [
    ({"x": 3}, "is of JSON type int; expected a file name"),
    ({"x": ["a"]}, "is of JSON type list"),
    ({"x": {"a": "b"}}, "is of JSON type dict"),
    ({"x": "/etc/passwd"}, "a path outside the model folder"),
])
def test_index_values_must_be_file_names(family, capsys, weight_map, message):
    _, (base, *experts), config_file = family
    (experts[1] / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and message in text and INDEX in text, text


def test_deeply_nested_index_is_a_message(family, capsys):
    _, (base, *experts), config_file = family
    (experts[1] / INDEX).write_text("[" * 100_000 + "]" * 100_000)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and "is not the shape of a header, index or config" in text
    (experts[1] / INDEX).write_text('{"pad": "' + " " * 100_000 + '", "w": ' + "[" * 5000 + "]" * 5000 + "}")
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and "nested too deeply" in text


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["models"][0]["parameters"].update(weight=float("nan")), "models[0].parameters.weight"),
    (lambda d: d["models"][1]["parameters"].update(weight=float("inf")), "not a finite number"),
    (lambda d: d["models"][0]["parameters"].update(weight=10**300), "a number of more than 100 characters"),
    (lambda d: d["models"][0]["parameters"].update(weight=1e39), "not a finite number a float32 can hold"),
    (lambda d: d.update(parameters={"lambda": float("nan")}), "parameters.lambda"),
    (lambda d: d.update(merge_method="ties", parameters={"density": float("nan")}), "density"),
    (lambda d: d.update(dtype="float16", parameters={"lambda": 1e6}), "overflows the compute dtype float16"),
    (lambda d: d.update(execution={"shard_size": float("inf")}), "execution.shard_size"),
    (lambda d: d.update(execution={"shard_size": "9000TB"}), "more than 1 PB"),
    (lambda d: d.update(execution={"seed": 10**30}), "execution.seed"),
    (lambda d: d.update(aim={"omega": float("nan")}), "aim.omega"),
    (lambda d: d.update(aim={"calibration": {"block_size": 10**12}}), "aim.calibration.block_size"),
])
def test_bad_parameters_fail_at_plan_time(family, capsys, edit, message):
    root, _, config_file = family
    data = config_data(config_file)
    edit(data)
    cfg = write_config(root / "bad.yml", data)
    code, text = run_cli(["plan", cfg], capsys)
    assert code == 2 and message in text, text


def test_slerp_nan_t_fails_at_plan_time(family, capsys):
    root, (base, *experts), _ = family
    cfg = write_config(root / "slerp.yml", {"merge_method": "slerp", "base_model": str(base),
                                            "models": [{"model": str(experts[0])}],
                                            "parameters": {"t": [0.0, float("nan")]}})
    code, text = run_cli(["plan", cfg], capsys)
    assert code == 2 and "parameters.t" in text and "finite" in text


@pytest.mark.parametrize(("text", "message"), [
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
     + "merge_method: linear\n", "expands to more than"),
    ("merge_method: linear\nmodels:\n  - {model: m, parameters: {weight: &w 1}}\n"
     + "  - {model: m, parameters: {weight: *w}}\n" * 300, "YAML aliases"),
    ("x: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested"),
    ("x: " + "9" * 5000 + "\n", "a number of more than 100 characters at line 1"),
    ("x: 0x" + "f" * 5000 + "\n", "a number of more than 100 characters"),
    ("x: " + ":".join(["1"] * 50_000) + "\n", "a number of more than 100 characters"),
    ("x: !!python/object/apply:os.system ['true']\n", "YAML syntax error"),
])
def test_hostile_yaml_is_refused_at_load(tmp_path, capsys, text, message):
    cfg = tmp_path / "bomb.yml"
    cfg.write_text(text)
    code, out = run_cli(["plan", cfg], capsys)
    assert code == 2 and message in out and str(cfg) in out, out


def test_alias_bomb_in_a_filter_value_is_refused_before_merging(family, capsys):
    root, (base, *experts), config_file = family
    bomb = "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 8)}]\n" for i in range(1, 9))
    text = ("x0: &x0 [a, a, a, a, a, a, a, a]\n" + bomb).replace("x0: &x0", "_bomb: &x0", 1)
    data = config_data(config_file)
    data["models"][0]["parameters"]["weight"] = [{"filter": "no-such-tensor", "value": "BOMB"}, {"value": 0.5}]
    body = yaml.safe_dump(data).replace("BOMB", "*x8")
    cfg = root / "bomb.yml"
    cfg.write_text("defs:\n" + "".join("  " + line + "\n" for line in text.splitlines()) + body)
    code, out = run_cli(["merge", cfg, root / "out", "--no-progress"], capsys)
    assert code == 2 and ("expands to more than" in out or "YAML aliases" in out), out
    assert not (root / "out").exists()


# --- special files: refused by type, never waited for --------------------------------------------

def test_fifo_shard_is_refused_not_waited_for(family, capsys):
    _, (base, *experts), config_file = family
    shard = sorted(experts[0].glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and f"{shard}: the safetensors file is a FIFO (named pipe)" in text


def test_fifo_config_and_index_are_refused(family, capsys):
    root, (base, *experts), config_file = family
    fifo_cfg = root / "fifo.yml"
    os.mkfifo(fifo_cfg)
    code, text = run_cli(["plan", fifo_cfg], capsys)
    assert code == 2 and "FIFO" in text
    (experts[0] / INDEX).unlink()
    os.mkfifo(experts[0] / INDEX)
    code, text = run_cli(["plan", config_file], capsys)
    assert code == 2 and "FIFO" in text and INDEX in text


@pytest.mark.parametrize("what", ["dataset", "stats"])
def test_fifo_as_aim_input_is_refused(family, capsys, what):
    root, (base, *experts), config_file = family
    fifo = root / ("calib.jsonl" if what == "dataset" else "stats.safetensors")
    os.mkfifo(fifo)
    data = config_data(config_file)
    data["aim"] = {"calibration": {"dataset": str(fifo)}} if what == "dataset" else {"stats": str(fifo)}
    cfg = write_config(root / "aim.yml", data)
    code, text = run_cli(["calibrate", cfg, "--out", root / "s.safetensors"] if what == "dataset"
                         else ["merge", cfg, root / "out", "--no-progress"], capsys)
    assert code == 2 and "FIFO" in text and str(fifo) in text, text


def test_calibrate_never_overwrites_a_file_it_did_not_write(family, capsys):
    root, (base, *experts), config_file = family
    data = config_data(config_file)
    data["aim"] = {}
    cfg = write_config(root / "aim.yml", data)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    before = snapshot(root / "models")
    code, text = run_cli(["calibrate", cfg, "--out", shard], capsys)
    assert code == 2 and "the statistics file (--out) is inside base_model" in text
    assert "Choose an --out path outside every input" in text and "output directory" not in text
    code, text = run_cli(["calibrate", cfg, "--out", root / "s.safetensors", "--plot", base / "stats.png"], capsys)
    assert code == 2 and "the --plot image is inside base_model" in text
    assert "Choose a --plot path outside every input" in text and "output directory" not in text
    assert not (root / "s.safetensors").exists()
    notes = root / "notes.safetensors"
    notes.write_text("not statistics")
    code, text = run_cli(["calibrate", cfg, "--out", notes], capsys)
    assert code == 2 and "is not an AIM statistics file" in text and notes.read_text() == "not statistics"
    assert snapshot(root / "models") == before


def test_pretokenized_ids_beyond_the_vocabulary_are_refused(family, capsys):
    root, _, config_file = family
    data_file = root / "ids.jsonl"
    data_file.write_text("".join(json.dumps({"input_ids": [1, 2, 3, 10**6]}) + "\n" for _ in range(4)))
    data = config_data(config_file)
    data["aim"] = {"calibration": {"dataset": str(data_file), "block_size": 4}}
    cfg = write_config(root / "aim.yml", data)
    code, text = run_cli(["calibrate", cfg, "--out", root / "s.safetensors"], capsys)
    assert code == 2 and "token ids span [1, 1000000]" in text and "260 entries" in text, text
    assert not (root / "s.safetensors").exists()


def test_dataset_folder_file_linking_outside_is_refused(family, capsys):
    root, _, config_file = family
    folder = root / "calib"
    folder.mkdir()
    (folder / "a.txt").write_text("first document\n\nsecond document\n")
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    (folder / "b.txt").symlink_to(secret)
    data = config_data(config_file)
    data["aim"] = {"calibration": {"dataset": str(folder)}}
    cfg = write_config(root / "aim.yml", data)
    code, text = run_cli(["calibrate", cfg, "--out", root / "s.safetensors"], capsys)
    assert code == 2 and "b.txt" in text and "outside the dataset folder" in text, text
    assert SECRET not in text


# --- found by trying it as a hostile or careless user --------------------------------------------

def test_calibrate_from_a_local_dataset_works(family, capsys):
    root, _, config_file = family
    data_file = root / "calib.jsonl"
    data_file.write_text("".join(json.dumps({"text": f"doc {i} on merging"}) + "\n" for i in range(8)))
    data = config_data(config_file)
    data["aim"] = {"calibration": {"dataset": str(data_file), "n_samples": 8, "block_size": 16}, "stages": 1}
    cfg = write_config(root / "aim.yml", data)
    code, text = run_cli(["calibrate", cfg, "--out", root / "stats.safetensors"], capsys)
    assert code == 0, text
    assert (root / "stats.safetensors").stat().st_size > 0


def _interrupted_copy(family, capsys) -> Path:
    """A finished merge turned into what a crash leaves: no index, files renamed back to .partial."""
    root, _, config_file = family
    out = root / "out"
    assert run_cli(["merge", config_file, out, "--no-progress"], capsys)[0] == 0
    for name in ("model.safetensors.index.json", "distmerge_manifest.json", "merge_report.json"):
        (out / name).unlink()
    for f in out.glob("model-*.safetensors"):
        f.rename(f.with_name(f.name + ".partial"))
    return out


def test_fifo_planted_at_a_temporary_name_is_refused_on_resume(family, capsys):
    root, _, config_file = family
    out = _interrupted_copy(family, capsys)
    victim = sorted(out.glob("*.partial"))[0]
    victim.unlink()
    os.mkfifo(victim)
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 2 and f"{victim}: is a FIFO (named pipe), not a file distmerge wrote" in text, text


def test_journal_names_outside_out_are_never_read_or_listed(family, capsys):
    root, _, config_file = family
    out = _interrupted_copy(family, capsys)
    secret = root / "secret.txt"
    secret.write_text(SECRET)
    with open(out / "distmerge_journal.jsonl", "a") as journal:
        for name in ("../secret.txt", str(secret), "sub/x"):
            journal.write(json.dumps({"kind": "wrote", "name": name}) + "\n")
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 0, text
    manifest = json.loads((out / "distmerge_manifest.json").read_text())
    assert all("/" not in name for name in manifest["other_files"])
    assert secret.read_text() == SECRET and main(["verify", str(out)]) == 0


@pytest.mark.parametrize("kind", ["notes", "fifo"])
def test_a_file_of_ours_name_that_is_not_ours_stays(family, capsys, kind):
    root, _, config_file = family
    out = root / "out"
    out.mkdir()
    if kind == "notes":
        (out / ".distmerge.lock").write_text("my notes")
    else:
        os.mkfifo(out / ".distmerge.lock")
        os.utime(out / ".distmerge.lock", (0, 0))
    code, text = run_cli(["merge", config_file, out, "--no-progress"], capsys)
    assert code == 2 and ".distmerge.lock: exists and is not a distmerge lock file" in text, text
    if kind == "notes":
        assert (out / ".distmerge.lock").read_text() == "my notes"


def test_careless_command_lines_are_messages(family, capsys, tmp_path):
    root, _, config_file = family
    long_out = root / ("x" * 300)
    code, text = run_cli(["merge", config_file, long_out, "--no-progress"], capsys)
    assert code == 2 and "File name too long" in text
    code, text = run_cli(["verify", long_out], capsys)
    assert code == 2 and "File name too long" in text
    for workers in ("-5", "0", "many"):
        with pytest.raises(SystemExit) as exit_info:
            main(["merge", str(config_file), str(root / "out"), "--workers", workers])
        assert exit_info.value.code == 2
    assert "--workers" in capsys.readouterr().err
    code, text = run_cli(["verify", root / "nowhere"], capsys)
    assert code == 1 and "nowhere: does not exist" in text
    code, text = run_cli(["verify", config_file], capsys)
    assert code == 1 and "is not a directory" in text


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["models"][0]["parameters"].update(weight=[{"filter": 1, "value": 0.5}]), "filter 1 is a int (a number or list)"),
    (lambda d: d.update(execution={"shard_size": 1.5}), "not a whole number of bytes"),
])
def test_filters_and_sizes_must_mean_what_they_say(family, capsys, edit, message):
    root, _, config_file = family
    data = config_data(config_file)
    edit(data)
    code, text = run_cli(["plan", write_config(root / "bad.yml", data)], capsys)
    assert code == 2 and message in text, text


def test_yaml_as_people_write_it(family, capsys, caplog):
    """Exponent floats are numbers (as in mergekit); a repeated key is a warning; NUL is refused."""
    root, (base, *experts), _ = family
    cfg = root / "exp.yml"
    cfg.write_text(f"merge_method: ties\nmerge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                   f"  - model: {experts[0]}\n    parameters: {{weight: 5e-1}}\n"
                   f"  - model: {experts[1]}\n    parameters: {{weight: 2.5E-1}}\nparameters: {{lambda: 1.0e0}}\n")
    code, text = run_cli(["plan", cfg], capsys)
    assert code == 0 and "merge method: task_arithmetic" in text, text
    assert "key 'merge_method' at line 2 repeats line 1" in caplog.text
    nul = root / "nul.yml"
    nul.write_bytes(cfg.read_bytes() + b"# \x00\n")
    code, text = run_cli(["plan", nul], capsys)
    assert code == 2 and "#x0000" in text


@pytest.mark.parametrize(("content", "message"), [
    ('"rms_norm_eps": NaN', "NaN is not a JSON value"),
    ('"max_position_embeddings": ' + "9" * 5000, "digits"),
])
def test_config_json_values_json_does_not_have(family, capsys, content, message):
    _, (base, *_), config_file = family
    text = (base / "config.json").read_text()
    (base / "config.json").write_text(text.replace("{", "{" + content + ",", 1))
    code, out = run_cli(["plan", config_file], capsys)
    assert code == 2 and message in out and "config.json" in out, out
