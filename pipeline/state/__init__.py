"""Adapted state in MLflow: checkpoints (versions, aliases, offsets), rescaling, the pyfunc flavour and export."""

import sys

import actors
from pipeline.state import base_model as _base_model

# A version's pyfunc runs the code it was saved with (a model from code), and versions saved
# before the base model's fetch moved here import it as ``actors.base_model``: that name stays
# theirs (docs/upgrading.md). Their code imports ``pipeline.state`` first.
sys.modules.setdefault("actors.base_model", _base_model)
actors.base_model = _base_model
