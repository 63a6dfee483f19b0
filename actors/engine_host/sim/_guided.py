"""Guided decoding in the sim: the answer to a request with a `json_schema` is a JSON
document valid against that schema, then EOS, as a constrained engine produces.

The "model" stays deterministic: the document is a function of the schema and of the
prompt's offset in the sim's alphabet (`_model.prompt_offset`), so tests can predict it.
Strings are lowercase words from the alphabet, numbers are small, an array has its
`minItems` items (at least one), an object has every property it declares, `enum` /
`const` / the first of `anyOf` / `oneOf` branches are taken as given. `$ref` into the
schema's own `$defs` / `definitions` is followed. A regex is not simulated (the request
gets the sim's ordinary answer); a schema that is not JSON is refused earlier, in
`_validation.check_guidance`.
"""

from __future__ import annotations

import json
from typing import Any

from actors.engine_host.sim._model import ALPHABET

__all__ = ["MAX_DEPTH", "guided_document"]

MAX_DEPTH = 16  # nesting beyond this is cut short (recursive schemas)
_WORD = 5  # letters per generated string


class _Instance:
    """Builds one instance of a schema, drawing letters and numbers from `offset` on."""

    def __init__(self, root: Any, offset: int) -> None:
        self.root = root
        self.offset = offset

    def _draw(self) -> int:
        self.offset += 1
        return self.offset

    def _word(self) -> str:
        start = self._draw()
        letters = (ALPHABET[(start + i) % 26] for i in range(_WORD))  # no space
        return "".join(letters)

    def _resolve(self, schema: Any) -> Any:
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def build(self, schema: Any, depth: int = 0) -> Any:
        """A value valid against `schema` (as far as the sim follows JSON Schema)."""
        schema = self._resolve(schema)
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return None if schema is False else {}
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][0]
        for key in ("anyOf", "oneOf", "allOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                merged = {k: v for k, v in schema.items() if k != key}
                return self.build({**merged, **self._resolve(branches[0])}, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        return self._of_type(kind, schema, depth)

    def _of_type(self, kind: Any, schema: dict[str, Any], depth: int) -> Any:
        if kind == "string":
            return self._word()
        if kind == "integer":
            low = schema.get("minimum", 0)
            return int(low) + self._draw() % 10 if isinstance(low, int | float) else 0
        if kind == "number":
            return float(self._draw() % 10) + 0.5
        if kind == "boolean":
            return self._draw() % 2 == 0
        if kind == "null":
            return None
        if kind == "array":
            count = schema.get("minItems", 1)
            count = max(1, count) if isinstance(count, int) else 1
            return [self.build(schema.get("items", {}), depth + 1) for _ in range(count)]
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {name: self.build(sub, depth + 1) for name, sub in properties.items()}


def guided_document(schema_text: str, offset: int) -> str:
    """The sim's answer to a request whose `json_schema` is `schema_text` (already checked
    to be a JSON object or boolean), for a prompt at `offset` in the alphabet."""
    schema = json.loads(schema_text)
    value = _Instance(schema, offset).build(schema if isinstance(schema, dict) else {})
    return json.dumps(value, ensure_ascii=False)
