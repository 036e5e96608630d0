"""The ttt-stream stream processor: Kafka sources and sinks, checkpoints, monitor, CLI."""
