"""Run mergekit 0.1.5's BuildTokenizer, PermutedVocabulary and _set_chat_template on cases
described in a JSON file; write what they produce (run with mergekit's own Python, not ours).

Usage: python mk_reference.py CASES.json OUT_DIR. Per case ``c`` it writes OUT_DIR/c/info.json
(vocabulary, added tokens, permutations, original vocabularies, or the error raised),
OUT_DIR/c/tokenizer/ (save_pretrained after the chat template) and OUT_DIR/c/<tensor>.safetensors
(the aligned tensor of each model under key m<i>, i its index in the tensor's model order).
"""

import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.io.tasks import GatherTensors
from mergekit.merge import _set_chat_template
from mergekit.tokenizer import BuildTokenizer, PermutedVocabulary
from mergekit.tokenizer.config import TokenizerConfig
from safetensors.torch import load_file, save_file


def ref(path):
    return ModelReference.parse(path)


def added(tok):
    return {str(i): {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                     "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
            for i, t in tok.added_tokens_decoder.items()}


def run_case(case, out):
    out.mkdir(parents=True, exist_ok=True)
    tcfg = TokenizerConfig(source=case["source"] if case["source"] in ("union", "base") else case["source"],
                           tokens=case.get("tokens"), pad_to_multiple_of=case.get("pad_to_multiple_of"))
    source = tcfg.source
    models = [ref(m) for m in case["models"]]
    base = ref(case["base_model"]) if case.get("base_model") else None
    task = BuildTokenizer(base_model=base, referenced_models=tuple(models), tokenizer_source=source,
                          add_tokens=tuple((tcfg.tokens or {}).keys()))
    result = {}
    try:
        info = task.execute()
    except Exception as e:
        result["error"] = [type(e).__name__, str(e)[:500]]
        (out / "info.json").write_text(json.dumps(result))
        return
    tok = info.tokenizer
    result["vocab"] = tok.get_vocab()
    result["added"] = added(tok)
    result["special"] = tok.all_special_tokens
    result["permutations"] = {
        str(i): [info.permutations[m].get(t) for t in range(len(result["vocab"]))]
        for i, m in enumerate(models)}
    result["original_vocabs"] = {str(i): info.original_vocabs[m] for i, m in enumerate(models)
                                 if m in info.original_vocabs}
    tensor_errors = {}
    for spec in case.get("tensors", []):
        tmodels = [ref(m) for m in spec["models"]]
        data = load_file(spec["file"])
        tensors = {m: data[f"m{i}"] for i, m in enumerate(tmodels)}
        pv = PermutedVocabulary(
            gather_tensors=GatherTensors(weight_info=ImmutableMap({})), tokenizer_task=task,
            tokens=ImmutableMap(dict(tcfg.tokens)) if tcfg.tokens else None,
            pad_to_multiple_of=tcfg.pad_to_multiple_of, base_model=base, vocabulary_axis=0)
        try:
            res = pv.execute(tokenizer_info=info, tensors=tensors)
        except Exception as e:
            tensor_errors[spec["name"]] = [type(e).__name__, str(e)[:500]]
            continue
        save_file({f"m{i}": res[m].contiguous() for i, m in enumerate(tmodels)},
                  str(out / f"{spec['name']}.safetensors"))
    result["tensor_errors"] = tensor_errors
    try:
        cfg = SimpleNamespace(chat_template=case.get("chat_template"), referenced_models=lambda: models)
        _set_chat_template(tok, cfg)
        tok.save_pretrained(str(out / "tokenizer"), safe_serialization=True)
    except Exception as e:
        result["template_error"] = [type(e).__name__, str(e)[:500]]
    (out / "info.json").write_text(json.dumps(result))


def main():
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    for name, case in cases.items():
        try:
            run_case(case, out / name)
        except Exception:
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "info.json").write_text(json.dumps({"crash": traceback.format_exc()[-2000:]}))


if __name__ == "__main__":
    main()
