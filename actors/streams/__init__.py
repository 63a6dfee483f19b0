"""Streams of the request plane: serving-mode shaping (`modes`) and the pure stream table
(`table`) the HandlerActor runs on."""
