"""The built-in linear layer kinds, one file each (file name = kind name, `lsp.kinds`); `_decay.py` and `_delta.py`
hold what the decay-only and the delta-rule kinds share. Files are imported on first use by
`lsp.models.layer_kind`."""
