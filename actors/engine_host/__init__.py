"""The engine host: the OS process that runs one engine (sim or SGLang) for EngineActor."""
