"""A tiny randomly initialised Llama with a byte-level tokenizer, built in memory (no files, no
network): the model unit tests and smoke runs use."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kuda_cli.config import TinySpec

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Every byte is a token (no merges): any text round-trips, vocabulary 260."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() order varies per call
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_llama(spec: TinySpec, vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # transformers' own initialisation visits modules in an order that varies between processes
    # (hash seeds), so the same seed gave different weights: re-initialise in name order.
    generator = torch.Generator().manual_seed(spec.init_seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    return model


def tiny_random(spec: TinySpec) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = byte_tokenizer(spec.max_position_embeddings)
    return tiny_llama(spec, len(tokenizer)), tokenizer
