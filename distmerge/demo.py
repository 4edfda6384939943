"""The main job end to end on a laptop: ``python -m distmerge.demo``.

Builds a tiny Llama base and two fine-tuned-like experts (sharded safetensors, index, config,
tokenizer), calibrates AIM on the base model with the built-in text, merges with task
arithmetic + AIM on this machine (threads of this process; Ray only where a cluster is given),
loads the result with transformers and generates.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

log = logging.getLogger("distmerge.demo")


def write_config(root: Path, base: Path, experts: list[Path], aim: bool) -> Path:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(experts[0]), "parameters": {"weight": 0.6}},
            {"model": str(experts[1]), "parameters": {"weight": [0.3, 0.7]}},
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "execution": {"shard_size": "64KB", "max_file_size": "400KB"},
    }
    if aim:
        config["aim"] = {"omega": 0.4, "calibration": {"dataset": "builtin", "n_samples": 32, "block_size": 512}}
    path = root / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--no-aim", action="store_true", help="plain merge without AIM")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distmerge.engine.run import run_merge
    from distmerge.testing.tiny import build_family

    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    models = root / "models"
    if not (models / "expert2" / "model.safetensors.index.json").exists():
        log.info("building a tiny Llama base and two experts under %s", models)
        build_family(models, n_experts=2, dtype=torch.bfloat16)
    base, experts = models / "base", [models / "expert1", models / "expert2"]
    config = write_config(root, base, experts, aim=not args.no_aim)
    out = root / "merged"
    report = run_merge(config, out, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The merged model says", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    print()
    print(f"merged checkpoint: {out}")
    print(f"merge report:      {out / 'merge_report.json'}")
    print(f"config:            {config}")
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters, "
          f"{model.dtype}); generated token ids: {generated[0, ids.shape[1]:].tolist()}")
    print(f"merge: {report['tensors']} tensors, {report['bytes_read']} bytes read, {report['bytes_written']} "
          f"written in {report['seconds']:.1f}s on {len(report['nodes'])} node(s)")
    if "aim" in report:
        mods = report["aim"]["modules"]
        top = sorted(mods.items(), key=lambda kv: -kv[1]["max_over_median"])[:5]
        print(f"AIM: omega {report['aim']['omega']}, {report['aim']['relaxed_tensors']} tensors relaxed, "
              f"statistics of {len(mods)} modules; most peaked (max/median):")
        for name, m in top:
            print(f"  {name:45s} {m['max_over_median']:.2f}")
    print(json.dumps({"ok": True, "checkpoint": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
