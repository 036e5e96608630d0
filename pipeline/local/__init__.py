"""The local stack that ``ttt-stream up`` starts, and the shipped corpus."""
