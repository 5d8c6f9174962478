"""The command line and what it runs: the demo, the terminal view, the local Prometheus/Alertmanager/Grafana stack."""

__all__: list[str] = []
