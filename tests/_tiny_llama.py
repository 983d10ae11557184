"""The small random Llama (GQA 4/2 heads, RoPE) that the KV-cache tests decode with."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )


def tiny_llama(config: LlamaConfig | None = None, seed: int = 0, device="cpu") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # A copy: enable() sets the attention implementation on the model's config.
    config = copy.deepcopy(config or tiny_llama_config())
    return LlamaForCausalLM(config).eval().to(device)
