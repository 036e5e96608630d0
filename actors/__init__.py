"""Ray actors that host TTT models (workers, context-parallel groups, supervisor)."""
