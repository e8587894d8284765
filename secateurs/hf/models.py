"""Tiny Hugging Face models built from configs (random init, no downloads) and their inputs.

Used by the tests and benchmarks: every family has 2 layers, hidden 64 (vision: small image
sizes), 4 heads (2 kv heads where the family has GQA), kv-cache off and
``attn_implementation="sdpa"`` (the default; it traces through ``torch.export`` as
``aten.scaled_dot_product_attention`` plus an explicit ``repeat_kv`` expand for GQA, which the
analysis reads as "kv head × group"). ``FAMILIES`` is the original six; ``ZOO`` every family
the family tests build (decoders, encoders, T5, vision, MoE).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILIES", "ZOO", "VISION", "AUDIO", "tiny_config", "tiny_model", "example_inputs",
           "output_tensor"]

FAMILIES = ("llama", "qwen2", "mistral", "bert", "gpt2", "vit")
VISION = {"vit": 16, "clip_vision": 16, "siglip_vision": 16, "swin": 32, "convnext": 32,
          "resnet": 32, "mobilenet_v2": 32, "regnet": 32,
          "mobilevit": 32}
AUDIO = {"wav2vec2": 400}  # raw waveform samples

# ------------------------------------------------------------ the wider zoo (one tiny config per
# architecture family; 2 layers, hidden 64, 4 heads, 2 kv heads where the family has GQA)

_LM = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=96, max_position_embeddings=64, use_cache=False)


def _zoo() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """family -> (config class, model class, config kwargs)."""
    gqa = dict(_LM, num_key_value_heads=2, tie_word_embeddings=False)
    moe = dict(gqa, num_local_experts=4, num_experts_per_tok=2)
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", gqa),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", gqa),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(gqa, sliding_window=None)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                      n_positions=64, use_cache=False)),
        "gptj": ("GPTJConfig", "GPTJForCausalLM",
                 dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                      n_positions=64, rotary_dim=8, use_cache=False)),
        "bloom": ("BloomConfig", "BloomForCausalLM",
                  dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, use_cache=False)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_LM)),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", gqa),
        "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                        dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                             n_positions=64, multi_query=True, use_cache=False)),
        "falcon": ("FalconConfig", "FalconForCausalLM",
                   dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, use_cache=False)),
        "cohere": ("CohereConfig", "CohereForCausalLM", gqa),
        "helium": ("HeliumConfig", "HeliumForCausalLM", dict(gqa, head_dim=16)),
        "glm": ("GlmConfig", "GlmForCausalLM", dict(gqa, head_dim=16)),
        "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                    dict(vocab_size=128, n_embd=128, n_layer=2, n_head=8, n_inner=96,
                         n_positions=64, rotary_dim=8, use_cache=False)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(gqa, head_dim=16)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(gqa, head_dim=16, sliding_window=16)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(gqa, head_dim=16, sliding_window=16)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", gqa),
        "opt": ("OPTConfig", "OPTForCausalLM",
                dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=64,
                     max_position_embeddings=64, use_cache=False)),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(_LM)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", moe),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(gqa, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(gqa, head_dim=16, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32)),
        # softmax routing with a [1, E] correction bias in a MoeStatics submodule, a shared
        # expert, a dense first layer
        "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                         dict(gqa, head_dim=16, moe_num_experts=4, moe_k=2,
                              moe_intermediate_size=32, moe_num_shared_experts=1,
                              moe_layer_start_index=1)),
        # the router's [E, H] weight in a Linear child (gate.wg), a shared MLP
        "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                           dict(gqa, head_dim=16, num_experts=4, moe_topk=2)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
                  dict(_LM, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)),
        "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
                   dict(moe, sliding_window=None)),
        "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                    dict(gqa, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
        # complex rotary (view_as_complex / view_as_real), a dense and a MoE layer, chunked
        # attention and a no-rope layer
        "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                        dict(gqa, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                             intermediate_size_mlp=96, interleave_moe_layer_step=2,
                             attention_chunk_size=4, no_rope_layers=[1, 0])),
        "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                        dict(gqa, num_key_value_heads=4, n_routed_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32,
                             n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                             topk_group=1, kv_lora_rank=16, q_lora_rank=24,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
        "bert": ("BertConfig", "BertModel",
                 dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)),
        "distilbert": ("DistilBertConfig", "DistilBertModel",
                       dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=96,
                            max_position_embeddings=64)),
        "modernbert": ("ModernBertConfig", "ModernBertModel",
                       dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=96,
                            max_position_embeddings=64, global_attn_every_n_layers=1)),
        "deberta_v2": ("DebertaV2Config", "DebertaV2Model",
                       dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=96,
                            max_position_embeddings=64)),
        "albert": ("AlbertConfig", "AlbertModel",
                   dict(vocab_size=128, embedding_size=32, hidden_size=64,
                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                        max_position_embeddings=64)),
        "t5": ("T5Config", "T5Model",
               dict(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                    num_decoder_layers=2, num_heads=4, use_cache=False)),
        "vit": ("ViTConfig", "ViTModel",
                dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, image_size=16, patch_size=4, num_channels=3)),
        "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel",
                        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, image_size=16, patch_size=4)),
        "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel",
                          dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=96, image_size=16, patch_size=4)),
        # two towers under one config without a hidden size of its own, and an
        # nn.MultiheadAttention pooling head
        "siglip": ("SiglipConfig", "SiglipModel",
                   dict(text_config=dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=96,
                                         max_position_embeddings=64),
                        vision_config=dict(hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=96,
                                           image_size=16, patch_size=4))),
        "swin": ("SwinConfig", "SwinModel",
                 dict(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                      num_heads=[2, 4], window_size=4, mlp_ratio=2.0)),
        "convnext": ("ConvNextConfig", "ConvNextModel",
                     dict(image_size=32, hidden_sizes=[16, 32], depths=[1, 1],
                          num_stages=2)),
        "resnet": ("ResNetConfig", "ResNetModel",
                   dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        layer_type="basic")),
        # depthwise and grouped convs, per-channel GroupNorm: counts the weights cannot tell
        "mobilenet_v2": ("MobileNetV2Config", "MobileNetV2Model",
                         dict(image_size=32, depth_multiplier=0.35)),
        "regnet": ("RegNetConfig", "RegNetModel",
                   dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                        groups_width=8)),
        # unfold to patches: attention over batch x patch_area, a run-time size that must stay
        "mobilevit": ("MobileViTConfig", "MobileViTModel",
                      dict(image_size=32, hidden_sizes=[32, 48, 64],
                           neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160])),
        "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model",
                     dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, conv_dim=(16, 16), conv_stride=(5, 2),
                          conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4)),
    }


ZOO = tuple(_zoo())


def tiny_config(family: str, **overrides: Any):
    import transformers as tf

    zoo = _zoo()
    if family not in zoo:
        raise ValueError(f"unknown family {family!r}; choose one of {ZOO}")
    cfg_cls, model_cls, kw = zoo[family]
    if "vocab_size" in kw and family not in ("gpt2", "bert"):
        kw = dict(kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = getattr(tf, cfg_cls)(**{**kw, **overrides})
    # sdpa where the architecture has it (the trace reads it as one op), else eager
    sdpa = getattr(getattr(tf, model_cls), "_supports_sdpa", False)
    cfg._attn_implementation = "sdpa" if sdpa else "eager"
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(tf, _zoo()[family][1])(cfg).eval()
    if family in _TORCH_INIT:
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            elif isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_parameters()
    return model


# HF's own init (normal, std 0.02; MobileViT's BatchNorm scales too) leaves these deep narrow
# CNNs' outputs at 0 (MobileViT) or 1e-25 (MobileNetV2), where every check passes: He init and
# unit BatchNorms keep them alive
_TORCH_INIT = frozenset({"mobilenet_v2", "mobilevit"})


def example_inputs(model_or_family: Any, batch: int = 2, seq: int = 8,
                   seed: int = 1) -> tuple[torch.Tensor, ...]:
    family = model_or_family if isinstance(model_or_family, str) else \
        getattr(model_or_family.config, "model_type", "")
    family = {"clip_vision_model": "clip_vision", "siglip_vision_model": "siglip_vision",
              "gemma3_text": "gemma3", "deberta-v2": "deberta_v2"}.get(family, family)
    g = torch.Generator().manual_seed(seed)
    if family in VISION:
        size = VISION[family]
        return (torch.randn(batch, 3, size, size, generator=g),)
    if family in AUDIO:
        return (torch.randn(batch, AUDIO[family], generator=g),)
    if family == "siglip":  # (input_ids, pixel_values)
        return (torch.randint(0, 128, (batch, seq), generator=g),
                torch.randn(batch, 3, 16, 16, generator=g))
    vocab = 128 if isinstance(model_or_family, str) else model_or_family.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if family == "t5":
        return (ids, None, torch.randint(0, vocab, (batch, seq), generator=g))
    return (ids,)


@torch.no_grad()
def output_tensor(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """The model's main output: ``logits`` where it has them, else ``last_hidden_state`` (or
    the pooled/first output of models without either). ``inputs``: a tuple (positional) or a
    dict (keywords)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    return out[0]
