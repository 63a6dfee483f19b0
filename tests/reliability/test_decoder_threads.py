"""Threads decoding a message type for the first time together must not crash.

msgspec builds a type's decoding tables on its first decode, and threads doing that at the
same moment could segfault the interpreter: a fresh node's two handlers decoding their
first `GenerateRequest`s together killed the whole node, silently (about one node in four
with a burst of four first requests). Importing `messages` now builds the tables for every
message type up front. Each probe below is a fresh interpreter where eight threads make
their own decoders for the node's inbound types and decode at once, with the GIL switching
every microsecond to widen the race: before the fix about one probe in four crashed.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from tests.node.harness import ROOT

PROBE = r"""
import sys, threading
sys.setswitchinterval(1e-6)
import msgspec
from messages.request import GenerateRequest, EmbedRequest, ResumeRequest, CancelRequest
payloads = [
    (GenerateRequest, b'{"request_id":"x","messages":[{"role":"user","content":"hi"}],'
     b'"stop":{"max_tokens":3},"sampling":{"temperature":0.5},"output":{"logprobs":2}}'),
    (EmbedRequest, b'{"request_id":"e","input":["a","b"]}'),
    (ResumeRequest, b'{"request_id":"r","from_index":3}'),
    (CancelRequest, b'{"request_id":"c"}'),
]
barrier = threading.Barrier(8)
def work(i):
    barrier.wait()
    for type_, data in payloads[i % 2:] + payloads[: i % 2]:
        msgspec.json.Decoder(type_).decode(data)
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
"""


def _probe(_: int) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    return done.returncode


def test_first_decodes_from_many_threads_at_once_do_not_crash() -> None:
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(_probe, range(30)))
    assert codes == [0] * 30, f"exit codes (-11 is a segfault): {codes}"
