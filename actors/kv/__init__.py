"""KV events: the replay client (`replay`) and the pure sequence tracker (`sequence`) the
KvRelayActor runs on."""
