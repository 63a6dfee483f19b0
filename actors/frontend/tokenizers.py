"""Tokenizers and chat templates for the frontend, one per model card.

A model card names its tokenizer (`ModelCard.tokenizer`): a local Hugging Face model
directory (loaded with `transformers.AutoTokenizer`, once per path, off the event loop),
or `"sim-bytes"`, the sim engine's byte tokenizer and chat template. The frontend sends
token ids on the wire, so what it computes here is exactly what the engine prefills,
and what the KV-aware router hashes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from actors.engine_host.sim._tokenizer import SimTokenizer
from actors.frontend.errors import FrontendError
from messages.discovery import ModelCard
from messages.request import ChatMessage

__all__ = ["SIM_BYTES", "HfTokenizer", "PromptTokenizer", "SimBytesTokenizer", "TokenizerCache"]

SIM_BYTES = "sim-bytes"
_SIM_ROLES = {"system", "user", "assistant", "tool"}


class PromptTokenizer(Protocol):
    """What the frontend needs of a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt (special tokens as the engine would add)."""
        ...

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders `tools` (else the frontend writes them)."""
        ...

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of chat messages with the model's template and the assistant opener;
        `tools` (OpenAI's tool objects) go to a template that renders them, and
        `template_kwargs` (e.g. `enable_thinking`) to the template as variables."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids (for logprobs and echo)."""
        ...


class SimBytesTokenizer:
    """The sim engine's tokenizer: one token per UTF-8 byte, its `<|role|>` template."""

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes, each + 3."""
        return SimTokenizer.encode(text)

    renders_tools = False  # `<|role|>` turns only: the frontend writes tools as text

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """The sim's chat template (`developer` turns count as `system`); it has no
        variables, and tools come written into the messages."""
        turns = []
        for message in messages:
            role = "system" if message["role"] == "developer" else message["role"]
            if role not in _SIM_ROLES:
                raise FrontendError(400, f"unsupported role {role!r}", param="messages")
            turns.append(ChatMessage(role=role, content=message["content"]))  # type: ignore[arg-type]
        return SimTokenizer.encode(SimTokenizer.apply_chat_template(turns))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Bytes back to text (specials dropped)."""
        return SimTokenizer.decode(token_ids)


class HfTokenizer:
    """A Hugging Face tokenizer (and its chat template), as SGLang would apply it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.renders_tools = _template_uses(getattr(tokenizer, "chat_template", None), "tools")

    def encode(self, text: str) -> list[int]:
        """`tokenizer.encode(text)`, as SGLang tokenizes a text prompt."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """`apply_chat_template(..., add_generation_prompt=True)`, as SGLang does."""
        extra: dict[str, Any] = {**(template_kwargs or {})}
        if tools:
            extra["tools"] = tools
        try:
            result = self.tokenizer.apply_chat_template(
                list(messages),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - a template refusing the messages is the input's
            raise FrontendError(
                400, f"the model's chat template refused the messages: {exc}", param="messages"
            ) from None
        return _ids_of(result)

    def decode(self, token_ids: Sequence[int]) -> str:
        """`tokenizer.decode(ids)`."""
        return str(self.tokenizer.decode(list(token_ids)))


def _template_uses(template: Any, variable: str) -> bool:
    """Whether a Jinja chat template (or any of a tokenizer's named templates) reads
    `variable`."""
    import jinja2
    import jinja2.meta

    templates = template.values() if isinstance(template, dict) else [template]
    for text in templates:
        if not isinstance(text, str):
            continue
        try:
            parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
        except jinja2.TemplateError:
            continue
        if variable in jinja2.meta.find_undeclared_variables(parsed):
            return True
    return False


def _ids_of(result: Any) -> list[int]:
    """Token ids from a tokenizer result: a list, or a mapping with `input_ids`."""
    if hasattr(result, "keys") and "input_ids" in result:
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    if result and isinstance(result[0], list):
        result = result[0]
    return [int(t) for t in result]


class TokenizerCache:
    """Tokenizers by card, loaded once per path (concurrent first uses share one load)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._loaded: dict[str, PromptTokenizer] = {SIM_BYTES: SimBytesTokenizer()}
        self._loading: dict[str, asyncio.Task[PromptTokenizer]] = {}

    async def get(self, card: ModelCard) -> PromptTokenizer:
        """The tokenizer for `card`; a 503 error if it cannot be had."""
        path = card.tokenizer
        if not path:
            raise FrontendError.of_code(
                "no_instances",
                f"model {card.name!r}: its card names no tokenizer, so the frontend cannot "
                "tokenize for it",
            )
        found = self._loaded.get(path)
        if found is not None:
            return found
        task = self._loading.get(path)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(path))
            self._loading[path] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(path, None)

    def warm(self, card: ModelCard) -> None:
        """Start loading a card's tokenizer ahead of its first request (errors are logged)."""
        if card.tokenizer and card.tokenizer not in self._loaded:
            task = asyncio.get_running_loop().create_task(self.get(card))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _load(self, path: str) -> PromptTokenizer:
        def load() -> Any:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)

        try:
            tokenizer = HfTokenizer(await asyncio.to_thread(load))
        except Exception as exc:  # noqa: BLE001 - a missing or broken directory
            self.log.warning("tokenizer not loadable", path=path, error=str(exc))
            raise FrontendError.of_code(
                "no_instances", f"cannot load the tokenizer at {path}: {type(exc).__name__}: {exc}"
            ) from None
        self._loaded[path] = tokenizer
        self.log.info("tokenizer loaded", path=path)
        return tokenizer
