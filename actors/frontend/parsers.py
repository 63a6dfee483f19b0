"""SGLang's tool-call and reasoning parsers, used by the frontend as a library.

Which parsers a model gets (`model_parsers`), in this order:
- `frontend.tool_call_parser` / `frontend.reasoning_parser`: a name for every model, or a
  table of names per model (the operator knows the model's format); `"none"` turns a
  reasoning parser off;
- the model card's `runtime_config` (`tool_call_parser`, `reasoning_parser`,
  `force_reasoning`): what the node set in `engine.sglang` or SGLang's template detection
  found (actors/engine_host/sglang_compat.py: detected_parsers);
- for tool calls only: when the model's chat template renders no tools (the built-in
  SmolLM2, the sim), the frontend writes the tools into the prompt itself in the Hermes
  convention (`<tools>` in the system message, `<tool_call>{"name", "arguments"}</tool_call>`
  in the answer; `tool_calls.py`) and parses the answer with SGLang's `hermes` parser.

`tool_choice: "required"` and a named function do not depend on the model's format: they
are enforced by guided decoding with SGLang's JSON schema for them (a JSON array of
`{"name", "parameters"}`), parsed by SGLang's `JsonArrayParser`.

Importing SGLang costs seconds and most of a gigabyte (it loads torch), so `ParserLoader`
does it once, off the event loop, when a request first needs a parser; a frontend whose
models have no reasoning parser and that gets no `tools` never imports it. Parser names
are checked at start against SGLang's own lists, read from its dependency-free modules
without importing the package.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.frontend.errors import FrontendError
from messages.discovery import ModelCard
from supervisor.config import FrontendSection

__all__ = [
    "HERMES",
    "ModelParsers",
    "ParserLoader",
    "SglangParsers",
    "ToolSpec",
    "check_parser_config",
    "model_parsers",
    "parser_names",
]

HERMES = "hermes"  # the format the frontend writes tools in for templates that have none
NO_PARSER = "none"
_NAME_LISTS = {  # SGLang 0.5.23: module path -> the list in it
    "srt/function_call/parser_names.py": "TOOL_CALL_PARSER_NAMES",
    "srt/parser/reasoning_parser_names.py": "REASONING_PARSER_NAMES",
}


@dataclass(frozen=True)
class ToolSpec:
    """One function tool of a request (OpenAI's `tools[i].function`)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(frozen=True)
class ModelParsers:
    """What a model's output is parsed with ('' = no such parser)."""

    tool_call: str
    frontend_writes_tools: bool  # its template renders no tools: the frontend does (Hermes)
    reasoning: str
    force_reasoning: bool  # the template opens the reasoning: the output has no start tag


def parser_names() -> tuple[frozenset[str], frozenset[str]]:
    """SGLang's tool-call and reasoning parser names (read from its source, not imported)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return frozenset(), frozenset()
    root = Path(next(iter(spec.submodule_search_locations)))
    found = []
    for path, name in _NAME_LISTS.items():
        tree = ast.parse((root / path).read_text())
        value: list[str] = []
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                value = list(ast.literal_eval(node.value))
        found.append(frozenset(value))
    return found[0], found[1]


def _per_model(value: str | dict[str, str], model: str) -> str:
    return value if isinstance(value, str) else value.get(model, "")


def check_parser_config(frontend: FrontendSection) -> list[str]:
    """Problems with `frontend.tool_call_parser` / `reasoning_parser`, naming the key."""
    tool_names, reasoning_names = parser_names()
    problems = []
    for key, known, extra in (
        ("tool_call_parser", tool_names, set()),
        ("reasoning_parser", reasoning_names, {NO_PARSER}),
    ):
        value = getattr(frontend, key)
        items = {"": value} if isinstance(value, str) else value
        for model, name in items.items():
            where = f"frontend.{key}" + (f".{model}" if model else "")
            if name and name not in known | extra:
                choices = ", ".join(sorted(known | extra))
                problems.append(f"{where}: unknown parser {name!r} (SGLang has: {choices})")
    return problems


def model_parsers(
    frontend: FrontendSection, card: ModelCard, template_renders_tools: bool
) -> ModelParsers:
    """The parsers for `card`'s model (see the module docstring for the order)."""
    runtime = card.runtime_config
    writes_tools = not template_renders_tools
    tool_call = _per_model(frontend.tool_call_parser, card.name)
    if not tool_call:  # the template's format, or ours when the template has none
        tool_call = HERMES if writes_tools else str(runtime.get("tool_call_parser") or "")
    reasoning = _per_model(frontend.reasoning_parser, card.name)
    force = bool(runtime.get("force_reasoning", False))
    if not reasoning:
        reasoning = str(runtime.get("reasoning_parser") or "")
    if reasoning == NO_PARSER:
        reasoning = ""
    return ModelParsers(tool_call, writes_tools, reasoning, force)


class SglangParsers:
    """SGLang's parser classes, imported (call from a worker thread: it takes seconds)."""

    def __init__(self) -> None:
        from sglang.srt.entrypoints.openai.protocol import Function, Tool, ToolChoice
        from sglang.srt.function_call.function_call_parser import FunctionCallParser
        from sglang.srt.function_call.json_array_parser import JsonArrayParser
        from sglang.srt.function_call.utils import get_json_schema_constraint
        from sglang.srt.parser.reasoning_parser import ReasoningParser

        self._function, self._tool, self._choice = Function, Tool, ToolChoice
        self._call_parser, self._array_parser = FunctionCallParser, JsonArrayParser
        self._constraint = get_json_schema_constraint
        self._reasoning = ReasoningParser

    def tools(self, specs: tuple[ToolSpec, ...]) -> list[Any]:
        """The tools as SGLang's `Tool` objects."""
        return [
            self._tool(
                type="function",
                function=self._function(
                    name=s.name,
                    description=s.description,
                    parameters=s.parameters,
                    strict=s.strict,
                ),
            )
            for s in specs
        ]

    def call_parser(self, name: str, specs: tuple[ToolSpec, ...]) -> Any:
        """SGLang's `FunctionCallParser` for the format `name`."""
        return self._call_parser(self.tools(specs), name)

    def array_parser(self) -> Any:
        """SGLang's `JsonArrayParser`: tool calls as the JSON array guided decoding forces."""
        return self._array_parser()

    def constraint(self, specs: tuple[ToolSpec, ...], named: str | None, parallel: bool) -> Any:
        """SGLang's JSON schema that forces a call (of `named`, or of any of the tools)."""
        choice: Any = "required" if named is None else self._choice(function={"name": named})
        return self._constraint(self.tools(specs), choice, parallel_tool_calls=parallel)

    def reasoning(self, name: str, force: bool) -> Any:
        """SGLang's `ReasoningParser` for the format `name` (streamed reasoning)."""
        return self._reasoning(name, stream_reasoning=True, force_reasoning=force or None)


class ParserLoader:
    """Loads `SglangParsers` once, off the event loop (concurrent first uses share it)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._loaded: SglangParsers | None = None
        self._loading: asyncio.Task[SglangParsers] | None = None

    async def get(self) -> SglangParsers:
        """The parsers; a 503 error if SGLang cannot be imported."""
        if self._loaded is not None:
            return self._loaded
        if self._loading is None or (self._loading.done() and self._loading.exception()):
            self._loading = asyncio.get_running_loop().create_task(self._load())
        return await asyncio.shield(self._loading)

    def warm(self) -> None:
        """Start loading ahead of the first request that needs a parser (errors logged)."""
        if self._loaded is None and self._loading is None:
            task = asyncio.get_running_loop().create_task(self.get())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _load(self) -> SglangParsers:
        try:
            parsers = await asyncio.to_thread(SglangParsers)
        except Exception as exc:  # noqa: BLE001 - reported to the request that needed it
            self.log.warning("SGLang's parsers are not loadable", error=str(exc))
            why = f"SGLang's tool-call and reasoning parsers cannot be loaded: {exc}"
            raise FrontendError.of_code("internal", why) from None
        self._loaded = parsers
        self.log.info("loaded SGLang's tool-call and reasoning parsers")
        return parsers
