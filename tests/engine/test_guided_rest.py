"""The constraint on the rest of a continued guided stream (`guided_rest`), checked with
the grammar engine SGLang uses (xgrammar): from every seam of a valid document, the
derived grammar accepts exactly the rests that make the whole valid under the original
regex (Python's `re` as the judge), and the JSON schema's rests parse as its documents."""

from __future__ import annotations

import json
import re

import pytest
import xgrammar
from hypothesis import given, settings
from hypothesis import strategies as st
from xgrammar.testing import _is_grammar_accept_string

from actors.engine_host.guided_rest import CannotContinue, rest_grammar

REGEX = r"[a-z]{2,4}-(\d{2}|x+)\.(com|org)"
JUDGE = re.compile(REGEX, re.ASCII)  # \d is [0-9] to SGLang's grammar engines, as here
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "tags"],
    }
)


def accepts(grammar: str, text: str) -> bool:
    return bool(_is_grammar_accept_string(xgrammar.Grammar.from_ebnf(grammar), text))


@settings(max_examples=60, deadline=None)
@given(
    document=st.from_regex(JUDGE, fullmatch=True),
    tail=st.text(alphabet="abx-.0123comrg", max_size=8),
    data=st.data(),
)
def test_the_rest_of_a_regex_is_exactly_what_completes_it(
    document: str, tail: str, data: st.DataObject
) -> None:
    seam = data.draw(st.integers(0, len(document)))
    grammar = rest_grammar(REGEX, None, document[:seam])
    assert accepts(grammar, document[seam:])
    for rest in (tail, document[seam:] + tail, document[seam + 1 :]):
        valid = JUDGE.fullmatch(document[:seam] + rest) is not None
        assert accepts(grammar, rest) == valid, (document[:seam], rest)


def test_the_rest_of_a_json_document_parses_as_the_schemas_from_every_seam() -> None:
    document = '{"name": "Zoë 🐢", "age": 31, "tags": ["a", "b c"]}'
    for seam in range(len(document) + 1):
        grammar = rest_grammar(None, SCHEMA, document[:seam])
        assert accepts(grammar, document[seam:]), seam
        # a rest breaking the schema is refused: a string where the age goes
        if seam < document.index("31"):
            broken = document[seam:].replace("31", '"31"')
            assert not accepts(grammar, broken), seam


def test_a_prefix_the_constraint_cannot_complete_cannot_continue() -> None:
    with pytest.raises(CannotContinue, match="not a prefix"):
        rest_grammar(REGEX, None, "ab-1x")
    with pytest.raises(CannotContinue, match="not a prefix"):
        rest_grammar(None, SCHEMA, '{"age": ')


def test_a_string_escape_beyond_the_schemas_regex_cannot_continue() -> None:
    # xgrammar's JSON allows "\n" in a string; outlines' regex of the schema does not
    with pytest.raises(CannotContinue, match="not a prefix"):
        rest_grammar(None, SCHEMA, '{"name": "a\\nb')


def test_a_finished_document_allows_only_the_end() -> None:
    grammar = rest_grammar(REGEX, None, "ab-12.com")
    assert accepts(grammar, "")
    assert not accepts(grammar, "x")
