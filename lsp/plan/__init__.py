"""Planning: the analytic cost model (costmodel), the layout planner behind `lsp plan` (planner) and the fake-tensor
measurement of one real-shape training step behind `lsp plan --measure` (measure).

Imports lsp.models and lsp.parallel (and the config schema), never the trainer."""
