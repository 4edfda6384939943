"""distmerge's named chat templates (``distmerge/data/chat_templates``, written for distmerge) render
exactly what mergekit 0.1.5's templates of the same name render: the same string for every
conversation, and an error of the same type (for the templates' own refusals, the same refusal)
where mergekit's template refuses one. Rendered as transformers renders chat templates (see
``chat_render``), with and without ``add_generation_prompt``, over every role sequence up to four
messages, explicit edge cases, hypothesis-generated conversations and ``apply_chat_template``."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmerge.vocab import resolve_chat_template
from distmerge.vocab.chat_template import named_templates
from tests.vocab.chat_render import (
    assert_same_rendering,
    mergekit_missing_reason,
    mergekit_templates_dir,
)

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
ROLES = ("system", "user", "assistant", "user_context", "tool")
CONTENTS = ("plain text", "", " \n edge whitespace\t ", "ünïcödé 🚀 中文 — ok", "\u3000wide\u2028",
            "\n\n", "a  b\n\nc", "<|im_end|> [INST] {{ not jinja }}")


@pytest.fixture(scope="module")
def mergekit_dir():
    found = mergekit_templates_dir()
    if found is None:
        pytest.skip(mergekit_missing_reason())
    return found


def pair(name, mergekit_dir):
    return resolve_chat_template(name), (mergekit_dir / f"{name}.jinja").read_text(encoding="utf-8")


def msg(role, content):
    return {"role": role, "content": content}


def test_the_same_names(mergekit_dir):
    assert named_templates() == sorted(NAMES)
    assert sorted(p.name[:-6] for p in mergekit_dir.glob("*.jinja")) == sorted(NAMES)


def role_sequences(max_len=4):
    for n in range(max_len + 1):
        yield from itertools.product(ROLES, repeat=n)


@pytest.mark.parametrize("name", NAMES)
def test_every_role_sequence(name, mergekit_dir):
    """All 781 role sequences of up to four messages over five roles, each with three
    different content assignments, with and without the generation prompt."""
    ours, theirs = pair(name, mergekit_dir)
    compared, texts = 0, 0
    for roles in role_sequences():
        for shift in range(3):
            messages = [msg(r, CONTENTS[(i + shift * 3) % len(CONTENTS)]) for i, r in enumerate(roles)]
            for generation in (False, True):
                texts += assert_same_rendering(ours, theirs, messages, generation)[0] == "text"
                compared += 1
    assert compared == 781 * 3 * 2
    assert texts > 0


S, U, A = "system", "user", "assistant"
EXPLICIT = [
    [],
    [msg(U, "Hello")],
    [msg(S, "Be brief."), msg(U, "Hello")],
    [msg(S, " Be brief. "), msg(U, " Hi "), msg(A, " Hello! ")],
    [msg(U, "Hi"), msg(A, "Hello"), msg(U, "Again")],
    [msg(S, "sys"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2"), msg(A, "a2")],
    [msg(r, str(i)) for i, r in enumerate([U, A] * 6)],
    [msg(S, ""), msg(U, ""), msg(A, "")],
    [msg(U, "ünïcödé 🚀"), msg(A, "中文 العربية")],
    [msg(U, "\t\n  padded  \n\t"), msg(A, "\r\n")],
    [msg(S, "only a system message")],
    [msg(S, "first"), msg(S, "second"), msg(U, "q")],
    [msg(U, "q"), msg(S, "late system")],
    [msg(U, "q"), msg(A, "a"), msg(S, "late system"), msg(U, "q2")],
    [msg(A, "assistant first")],
    [msg(S, "s"), msg(A, "assistant after system")],
    [msg(U, "q1"), msg(U, "q2")],
    [msg(U, "q"), msg(A, "a1"), msg(A, "a2")],
    [msg("user_context", "context"), msg(U, "q")],
    [msg(U, "q"), msg("user_context", "ctx"), msg(A, "a")],
    [msg(U, "q"), msg("tool", "result")],
    [msg("User", "capitalised role")],
    [msg("", "empty role")],
    # content/role missing, None, or not a string: both render the same or both fail the same way
    [msg(U, None)],
    [msg(S, None), msg(U, "q")],
    [{"role": U}],
    [{"role": S}, msg(U, "q")],
    [{"content": "no role"}],
    [msg(None, "role None")],
    [msg(U, [{"type": "text", "text": "a list"}])],
    [msg(U, "q"), {"role": A, "content": "a", "name": "bot", "extra": 1}],
]
TOKENS = [None, {}, {"bos_token": "", "eos_token": ""}, {"bos_token": "<|begin_of_text|>"},
          {"bos_token": None, "eos_token": None}]


@pytest.mark.parametrize("name", NAMES)
def test_explicit_conversations(name, mergekit_dir):
    ours, theirs = pair(name, mergekit_dir)
    for messages, generation, tokens in itertools.product(EXPLICIT, (False, True), TOKENS):
        assert_same_rendering(ours, theirs, messages, generation, tokens)


def test_refusals_kept(mergekit_dir):
    """The templates' own refusals, and the inputs both fail on, stay refusals."""
    def result(name, messages, generation=False):
        return assert_same_rendering(*pair(name, mergekit_dir), messages, generation)

    assert result("mistral", [msg(A, "a")]) == ("error", "TemplateError", "alternation")
    assert result("mistral", [msg(U, "q"), msg(U, "q")]) == ("error", "TemplateError", "alternation")
    assert result("mistral", [msg(U, "q"), msg("tool", "t")]) == ("error", "TemplateError",
                                                                   "unsupported role")
    assert result("mistral", [])[0] == "error"
    assert result("alpaca", [], generation=True)[0] == "error"
    assert result("chatml", [msg(U, None)])[0] == "error"
    assert result("llama3", [msg(U, "q")]) == ("text", "<s><|start_header_id|>user<|end_header_id|>"
                                                       "\n\nq<|eot_id|>\n")


text = st.text(max_size=40)
content = st.one_of(
    st.sampled_from(CONTENTS),
    text,
    st.builds(lambda a, b, c: a + b + c, st.text(" \t\n\r\u3000\u00a0\u2028", max_size=4), text,
              st.text(" \t\n\r\u3000\u00a0\u2028", max_size=4)),
)
role = st.one_of(st.sampled_from(ROLES), st.sampled_from(("User", "function", "", "ipython")), text)
free_conversation = st.lists(st.builds(msg, role, content), max_size=8)


@st.composite
def alternating_conversation(draw):
    """An optional system message, then user/assistant turns, ending with either."""
    system = [msg(S, draw(content))] if draw(st.booleans()) else []
    turns = draw(st.integers(0, 9))
    return system + [msg(U if i % 2 == 0 else A, draw(content)) for i in range(turns)]


tokens = st.one_of(st.none(), st.fixed_dictionaries({"bos_token": st.sampled_from(["<s>", "", "<|x|>"]),
                                                     "eos_token": st.sampled_from(["</s>", "", "<|y|>"])}))
HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", NAMES)
@HYPOTHESIS
@given(messages=st.one_of(free_conversation, alternating_conversation()), generation=st.booleans(),
       special=tokens)
def test_generated_conversations(name, mergekit_dir, messages, generation, special):
    ours, theirs = pair(name, mergekit_dir)
    assert_same_rendering(ours, theirs, messages, generation, special)


@pytest.mark.parametrize("name", NAMES)
def test_apply_chat_template(name, mergekit_dir):
    """Through a tokenizer's apply_chat_template (its bos/eos tokens: <s>, </s>)."""
    from tests.vocab.conftest import make_tokenizer

    ours, theirs = pair(name, mergekit_dir)
    tok = make_tokenizer(64, [])
    for messages, generation in itertools.product(EXPLICIT[:21], (False, True)):
        results = []
        for template in (ours, theirs):
            try:
                results.append(tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                       add_generation_prompt=generation))
            except Exception as e:
                results.append(type(e).__name__)
        assert results[0] == results[1], (messages, generation)
