"""The OpenAI-compatible HTTP frontend with KV-aware routing across nodes.

`FrontendActor` serves `/v1/chat/completions`, `/v1/completions`, `/v1/responses`,
`/v1/embeddings`, `/v1/models`, `/health` and `/metrics`; it finds instances in discovery,
follows their KV caches and load on the event plane, and routes each request to the rank
that already holds most of its prompt (or round-robin / random). See README.md, "Frontend".

Modules: `actor` (the supervised child), `server` (HTTP + NATS on their own loop),
`routes` / `generation` / `responses_api` / `http_io` (HTTP), `openai_formats` /
`openai_responses` / `responses_input` / `responses_output` (OpenAI's bodies),
`tool_calls` / `parsers` / `choice_output` (tools and reasoning, with SGLang's parsers),
`choices` (the engine requests of one request), `response_store`, `tokenizers`,
`discovery`, `indexer`, `router`, `dispatch` / `streams` / `embeddings` (the request path;
replies come through `supervisor.client_replies`), `state`, `metrics`, `errors`. Its
place in a tree is built by `supervisor/tree.py`.
"""

from actors.frontend.actor import FrontendActor

__all__ = ["FrontendActor"]
