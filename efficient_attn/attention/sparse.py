"""Placeholder: being written."""
def block_sparse_attention(*a, **k): raise NotImplementedError
