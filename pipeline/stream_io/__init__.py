"""The stream's I/O: Kafka sources and sinks, topics, the parsing of other people's records, feeding, offsets, the control topic."""
