"""lsp: exact sequence-parallel training of hybrid linear/softmax attention language models."""
__version__ = "0.1.0"
