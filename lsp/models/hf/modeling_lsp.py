"""`HybridLM` behind the transformers API (written by `lsp export` as the model folder's remote code).

    model = AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)
    model(input_ids).logits                      # == lsp's HybridLM logits
    model.generate(input_ids, max_new_tokens=N)  # recurrent decoding through lsp's per-layer caches

The weights are lsp's own parameter names under the prefix `model.`; the config keeps lsp's `HybridConfig` as the
dict `lsp`. Decoding state is lsp's `DecodeCache` (linear states + KV caches), made in forward (transformers' route for
a model that keeps its own recurrent state: no `Cache` is built for it) and carried under the name the installed
transformers uses, `CACHE_NAME`: `cache` in current 5.x, `past_key_values` before (under 5.25 the old name was never
passed back in, so every step re-fed the whole prefix, and it warned). Unpadded prompts only (an attention_mask with
zeros is refused), greedy or sampled decoding (no beam search).
`labels` follow the transformers convention (the model shifts them).
"""
from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lsp.models import HybridConfig, HybridLM, LinearKind
from lsp.models.loss import IGNORE_INDEX
from lsp.models.moe import MoE

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LspHybridConfig(PretrainedConfig):
    model_type = "lsp_hybrid"

    def __init__(self, lsp: dict | None = None, **kwargs):
        self.lsp = dict(lsp or {})
        for hf_name, lsp_name in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                                  ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads")):
            if lsp_name in self.lsp:
                kwargs.setdefault(hf_name, self.lsp[lsp_name])
        kwargs["tie_word_embeddings"] = False   # HybridLM shares embed.weight itself when tie_embeddings
        super().__init__(**kwargs)


class LspHybridForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LspHybridConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: LspHybridConfig):
        super().__init__(config)
        self.model = HybridLM(HybridConfig.from_dict(config.lsp))
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.restore_buffers()
        return model

    def restore_buffers(self) -> None:
        """Buffers that are derived from the config or counted and not saved (e.g. Lightning's decays, an MoE
        layer's expert load) come out of transformers' meta-device loading uninitialised: each module sets its own
        again."""
        for module in self.model.modules():
            if isinstance(module, (LinearKind, MoE)):
                module.reset_buffers()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False   # the decoding state is lsp's DecodeCache, made in forward

    def _init_weights(self, module):
        pass           # HybridLM initialises itself; the checkpoint overwrites every parameter

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids=None, attention_mask=None, cache=None, labels=None, use_cache=None,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        # input_ids: [B, T] (the tokens after cache.seen when a cache is given) -> logits [B, T, vocab]
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask: padded batches are not supported; pass prompts of equal length")
        cache = cache if cache is not None else past_key_values   # either name, whichever transformers passes
        if cache is None and use_cache:
            cache = self.model.new_cache()
        aligned = None
        if labels is not None:   # transformers labels are the inputs; lsp's are the next tokens, aligned
            aligned = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        out = self.model(input_ids, labels=aligned, return_logits=True, cache=cache)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits, **{CACHE_NAME: cache})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      **kwargs):
        # feed only the tokens the cache has not consumed: the whole prompt first, then one token per step
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, CACHE_NAME: cache, "attention_mask": attention_mask, "use_cache": True}
