"""The EngineActor's pure core: who may enter and where output goes (`admission`), and
whether the engine is healthy (`health`)."""
