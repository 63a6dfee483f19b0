"""sgl-node, the application: `python -m supervisor CONFIG` and what composes it.

Thin modules that build and run a node from its configuration (config -> plan -> tree
-> run), the client and chaos CLIs, and the bootstrap. The generic supervision library
they are built on is `supervisor.core`; it knows nothing of this application.

Importing this package loads only `stop_signals` (the standard library's signal module):
the engine host process uses `supervisor.config` and `supervisor.logs` without loading
the supervision library or pykka.
"""

# First: `python -m supervisor` (the node) catches its stop signals on this import, before
# the node's imports take their few tenths of a second (see stop_signals; for any other
# use of the package it does nothing).
from supervisor import stop_signals  # noqa: F401
