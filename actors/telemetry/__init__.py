"""The node's Prometheus metrics, defined in one place (`node_metrics`)."""
