"""`HandlerActor`: the request plane. One of a pool; each takes requests from NATS.

A request is decoded and checked (bad input gets one `invalid_request` chunk naming the
field, and the handler carries on), submitted to the EngineActor, and its output streamed
chunk by chunk to the reply subject. Every accepted request ends with a finish reason:
tokens, `cancelled`, `shutdown`, or `error` with a code. On stop the handler takes no new
requests, lets in-flight ones finish within the drain timeout, then ends the rest with
`shutdown`.

Chunks can be lost in transit (a NATS server restart drops what it was carrying), so the
handler keeps every stream's chunks while it runs and for `handlers.resume_window` seconds
after it ended (within `handlers.resume_buffer_bytes`); a client that sees a gap, or hears
nothing for a while, asks on the resume subject and gets them again.

What to do with each stream is decided by its pure core, `actors.streams.table`; this
actor decodes, calls the core, and carries out what it returns (publish, abort, timers).

Handlers are `LoopActor`s hosted on the NATS link's event loop, where the engine's output
is read too (`actors.engine_output`): a request arrives, a step's chunks are routed to
their handler and published without a thread hand-off in the node. So a handler never
blocks in `handle`: the one wait it has, offering streams to another instance at the
drain deadline, is a task on the loop whose answer comes back as a message (the
handler's engine output waits meanwhile, as it waited in a blocked thread's mailbox).

Modules: `actor` (the supervised child: start, stop, the match on messages, drain and
hand-over), `admission` (the checks a request passes before its stream opens, generate
and embed), `streams` (the handler's state and the carrying out of what the table
decides: submit, engine output, cancel, resume, ends). Its pure checks are in
`actors.streams.admission`.
"""

from actors.handler.actor import HandlerActor

__all__ = ["HandlerActor"]
