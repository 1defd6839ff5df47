"""Chunked (fused linear + cross-entropy) loss that never holds [N, vocab] logits for the whole sequence.

For hidden states h [N, D], head weight W [V, D] and targets y [N] (ignore_index skipped):

    loss_sum = Σ_{n: y_n != ignore} ( logsumexp_v (h_n · W_v) - h_n · W_{y_n} )

The forward walks over chunks of `chunk_size` tokens; for each chunk it forms the [C, V] logits once, adds the chunk's
loss and, when gradients are needed, the chunk's gradients straight away (dlogits = softmax - onehot):

    dh_chunk = dlogits @ W,        dW += dlogitsᵀ @ h_chunk

so backward only scales the stored dh, dW by the incoming gradient: no logits are kept or recomputed, and peak extra
memory is one [C, V] block plus dh, dW (the size of h and W). This is the "fused linear cross-entropy" of Liger-Kernel.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lsp.names import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_size, ignore_index, grad_enabled):
        # h: [N, D]; weight: [V, D]; labels: [N] long -> loss_sum: [] (fp32, fp64 for fp64 h)
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        # grad mode is off inside forward, so the caller tells whether a backward can follow
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], labels[start:start + chunk_size]
            logits = (hc @ weight.t()).to(acc)                               # [C, V]
            valid = yc != ignore_index
            target = yc.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w:
                dlogits = logits.sub_(lse[:, None]).exp_()  # softmax in place: one [C, V] buffer per chunk
                dlogits[torch.arange(len(yc), device=h.device), target] -= 1.0
                dlogits *= valid[:, None]
                dlogits = dlogits.to(h.dtype)
                if need_h:
                    grad_h[start:start + chunk_size] = dlogits @ weight
                if need_w:
                    grad_w += (dlogits.t() @ hc).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 4096,
                          ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of logits h @ weightᵀ against labels, and the number of counted tokens.

    h: [..., D]; weight: [V, D]; labels: [...] long (same leading shape as h).
    Returns (loss_sum [] in fp32 / fp64, count [] long). Differentiable in h and weight.
    """
    if labels.shape != h.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(h.shape[:-1])} (aligned with input_ids), "
                         f"got {tuple(labels.shape)}")
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1).long()
    loss_sum = _ChunkedLinearCrossEntropy.apply(h2, weight, y, chunk_size, ignore_index, torch.is_grad_enabled())
    return loss_sum, (y != ignore_index).sum()


def head_output(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *, chunk_size: int):
    """The output head on final hidden states: logits h @ weightᵀ [..., V] when labels is None, else the chunked
    (loss_sum, count) of `chunked_cross_entropy`. h: [..., D]; weight: [V, D]; labels: [...] long or None."""
    if labels is None:
        return h @ weight.t()
    return chunked_cross_entropy(h, weight, labels, chunk_size=chunk_size, ignore_index=IGNORE_INDEX)


class LMHead(nn.Linear):
    """The untied output projection (weight [vocab, D], no bias) that also computes the loss in its own forward.

    Every use of the weight, logits and the fused cross-entropy alike, happens inside this module's forward and the
    backward of what it returns, which is where an engine that gathers a module's sharded weights around its forward
    and backward (DeepSpeed ZeRO-3) makes the weight whole. Used from the root module's forward, the weight stayed
    partitioned when the cross-entropy's gradient reached it (a shape error in the first backward)."""

    def __init__(self, hidden_size: int, vocab_size: int, chunk_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)
        self.chunk_size = chunk_size

    def forward(self, h, labels=None):
        # h: [..., D]; labels: [...] long or None -> logits [..., vocab] or (loss_sum [], count [])
        return head_output(h, self.weight, labels, chunk_size=self.chunk_size)
