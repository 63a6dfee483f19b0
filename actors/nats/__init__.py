"""The node's NATS plumbing: the connection every actor shares (`link`), credentials
(`auth`), and the cuttable proxy fault injection uses (`proxy`)."""
