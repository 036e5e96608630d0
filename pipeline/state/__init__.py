"""Adapted state in MLflow: checkpoints (versions, aliases, offsets), rescaling, the pyfunc flavour and export."""
