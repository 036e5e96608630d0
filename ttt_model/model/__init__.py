"""The model: In-Place TTT attached to a Hugging Face causal LM. The fast-weight MLP and its
update rule, the streaming state, the forward's call context, and the session that reads a
document in pieces of any length."""
