"""Tiny Hugging Face models built from configs (random init, no downloads) and their inputs.

Used by the tests and benchmarks: every family has 2 layers, hidden 64, 4 heads (2 kv heads
where the family has GQA), kv-cache off and ``attn_implementation="sdpa"`` (the default;
it traces through ``torch.export`` as ``aten.scaled_dot_product_attention`` plus an explicit
``repeat_kv`` expand for GQA, which the analysis reads as "kv head × group").
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILIES", "tiny_config", "tiny_model", "example_inputs", "output_tensor"]

FAMILIES = ("llama", "qwen2", "mistral", "bert", "gpt2", "vit")


def tiny_config(family: str, **overrides: Any):
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}
        kw = dict(common, vocab_size=128, intermediate_size=96, num_key_value_heads=2,
                  max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
        if family == "mistral":
            kw["sliding_window"] = None
        cfg = cls[family](**{**kw, **overrides})
    elif family == "bert":
        cfg = tf.BertConfig(**{**dict(common, vocab_size=128, intermediate_size=96,
                                      max_position_embeddings=64), **overrides})
    elif family == "gpt2":
        cfg = tf.GPT2Config(**{**dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                      n_inner=96, n_positions=64, use_cache=False), **overrides})
    elif family == "vit":
        cfg = tf.ViTConfig(**{**dict(common, intermediate_size=96, image_size=16, patch_size=4,
                                     num_channels=3), **overrides})
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    cfg._attn_implementation = "sdpa"
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    if family == "bert":
        model = tf.BertModel(cfg)
    elif family == "vit":
        model = tf.ViTModel(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def example_inputs(model_or_family: Any, batch: int = 2, seq: int = 8,
                   seed: int = 1) -> tuple[torch.Tensor, ...]:
    family = model_or_family if isinstance(model_or_family, str) else \
        getattr(model_or_family.config, "model_type", "")
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return (torch.randn(batch, 3, 16, 16, generator=g),)
    vocab = 128 if isinstance(model_or_family, str) else model_or_family.config.vocab_size
    return (torch.randint(0, vocab, (batch, seq), generator=g),)


@torch.no_grad()
def output_tensor(model: torch.nn.Module, inputs: tuple[Any, ...]) -> torch.Tensor:
    """The model's main output: ``logits`` where it has them, else ``last_hidden_state``."""
    out = model(*inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
