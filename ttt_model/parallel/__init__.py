"""Context parallelism: one document split into contiguous segments over the ranks of a
``torch.distributed`` process group (gloo on CPU, nccl on GPU). The ranks and their collectives
(``group``), attention across segments (``attention``), and the forward whose TTT layers combine
their chunk updates across ranks (``forward``)."""

from ttt_model.parallel.forward import context_parallel_forward
from ttt_model.parallel.group import CommunicationTimer, ContextParallelGroup, split_lengths

__all__ = ["CommunicationTimer", "ContextParallelGroup", "context_parallel_forward", "split_lengths"]
