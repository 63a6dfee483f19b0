"""sgl-node, the application: `python -m supervisor CONFIG` and what composes it.

Thin modules that build and run a node from its configuration (config -> plan -> tree
-> run), the client and chaos CLIs, and the bootstrap. The generic supervision library
they are built on is `supervisor.core`; it knows nothing of this application.

Importing this package imports nothing: the engine host process uses `supervisor.config`
and `supervisor.logs` without loading the supervision library or pykka.
"""
