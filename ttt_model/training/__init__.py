"""Training tools, apart from the stream: pretraining and continual training with In-Place TTT
(``python -m ttt_model.training.train``), held-out loss by position
(``python -m ttt_model.training.evaluate``), and the paper's reference checkpoints converted."""
