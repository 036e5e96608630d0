"""Watching a stream: Prometheus metrics, the degradation monitor, the processor's MLflow run, status views."""
