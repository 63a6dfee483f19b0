"""Discovery: the instance lease the RegistrarActor keeps (`lease`, its pure core)."""
