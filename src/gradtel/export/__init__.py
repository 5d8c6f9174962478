"""Where the counts go: the OpenTelemetry instruments, one context per prometheus-client registry, the /metrics endpoint and its HTTP server, the process labels, OTLP."""

__all__: list[str] = []
