"""Ray actors that host TTT models (readers, context-parallel groups, supervisor)."""
