"""Fault injection plumbing used inside actors (`zmq_faults`: drop or delay a socket's
messages)."""
