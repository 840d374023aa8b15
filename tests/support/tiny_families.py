"""A tiny random instance of every causal-LM family the installed transformers ships.

``FAMILIES`` is transformers' own list (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES). ``tiny_config`` starts
from a family's default config and shrinks its sizes (2 blocks, width 64, 4 experts, ...) by the
attribute names the families share, plus the few per-family fields the shrink needs (``FIXES``).
``SKIP`` says, per family, why it is not built here; everything else must either run through the
engine or be refused up front with a reason (tests/engine/test_coverage_families.py).
"""

from __future__ import annotations

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
VOCAB = 384

# attribute -> tiny value, set wherever a family's config has that attribute
SIZES = dict(
    hidden_size=64,
    n_embd=64,
    d_model=64,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    n_layers=2,
    num_attention_heads=4,
    n_head=4,
    num_heads=4,
    num_key_value_heads=2,
    num_kv_heads=2,
    intermediate_size=128,
    ffn_dim=128,
    n_inner=128,
    dff=128,
    ffn_hidden_size=128,
    head_dim=16,
    max_position_embeddings=256,
    n_positions=256,
    num_local_experts=4,
    num_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    expert_intermediate_size=32,
    vocab_size=VOCAB,
    # multi-head latent attention (DeepSeek-V2/V3, GLM-4-MoE-lite, MiniCPM3, LongCat)
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    qk_head_dim=16,
    n_group=1,
    topk_group=1,
    rotary_dim=8,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    # dense first blocks and shared experts of their own width (Ergo, Kolibri)
    first_dense_intermediate_size=128,
    shared_intermediate_size=64,
    mlp_only_intermediate_size=128,
)
FIXES = {  # what the shared sizes leave inconsistent in one family
    "mamba2": dict(num_heads=8),  # hidden * expand == num_heads * head_dim
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    # their sliding-window / output low-rank / indexer sizes are separate fields (8192-wide projections otherwise)
    **{
        f: dict(
            swa_num_attention_heads=4,
            swa_num_key_value_heads=2,
            swa_head_dim=16,
            sliding_window_size=32,
            rel_extent=64,
            unpadded_vocab_size=VOCAB,
        )
        for f in ("inkling_text", "inkling2_text", "inkling2_loop_text")
    },
    "deepseek_v4": dict(o_lora_rank=16, o_groups=2, index_n_heads=4, index_head_dim=16, index_topk=16),
    # one sliding and one indexed-attention block, the first with a dense MLP, the second with experts;
    # the indexer's heads must fit the query heads of one key head (4 // 2)
    "kolibri1_1": dict(
        layer_types=["sliding_attention", "indexed_attention"],
        mlp_only_layers=[0],
        index_num_heads=2,
        index_topk=16,
        index_pool_size=64,
        index_compression=4,
        index_num_local_tokens=4,
        index_num_sink_tokens=2,
    ),
}
# multi-head latent attention: the rotary part is head_dim wide and every head has its own K/V
MLA = dict(head_dim=8, num_key_value_heads=4)
# Families whose default config the shared shrink above does not turn into a consistent tiny one
# (a limit of this test's generic shrink, not an engine refusal): each with what breaks.
_SHRINK = "the generic tiny shrink of its config does not build: "
SHRINK_FAILS = {
    "cohere_compass_text": "its layer kinds are not the standard layer_types names (KeyError 'full_attention')",
    "dbrx": "sizes live in nested attn_config / ffn_config dicts",
    "dots1": "first_k_dense_replace and its MoE sizes need values together (int * None)",
    "dots3_note_text": "heads are a per-layer attribute (per_layer_config)",
    "gemma3n_text": "its KV-sharing layer types need more than 2 layers",
    "gemma4_assistant": "hidden_size_per_layer_input must be 0 for the assistant",
    "gemma4_text": "head_dim is a per-layer attribute (per_layer_config)",
    "gemma4_unified_text": "head_dim is a per-layer attribute (per_layer_config)",
    "lfm2_moe": "its dense/MoE layer split (num_dense_layers, layer_types) needs values together",
    "zamba": "its layer types (hybrid mamba/attention) fail the config's validator at 2 layers",
    "zamba2": "its layer types (hybrid mamba/attention) fail the config's validator at 2 layers",
    "zaya": "its layer types fail the config's validator at 2 layers",
    "reformer": "its axial position embeddings are sized for the default width (and it needs is_decoder)",
}

_VISION = "a vision-language model (an image tower beside the text decoder); its text-only family is tested"
_ENCODER = "an encoder (BERT-style) used as a decoder; not a decoder-only family"
SKIP = {
    "blt": "Byte Latent Transformer: local byte encoder/decoder around a global model, no single stack of "
    "decoder blocks (its tiny config does not build within the test's time)",
    "fuyu": _VISION,
    "emu3": "a vision-language model with an image tokenizer (VQ-VAE) inside",
    "gemma3": _VISION + " (gemma3_text)",
    "gemma3n": "needs extra deps (timm, PIL) for its audio/vision towers",
    "gemma4": _VISION + " (gemma4_text)",
    "gemma4_unified": _VISION + " (gemma4_unified_text)",
    "gemma4_unified_assistant": _VISION,
    "llama4": _VISION + " (llama4_text)",
    "mllama": _VISION,
    "got_ocr2": _VISION,
    "dots3_note": _VISION + " (dots3_note_text)",
    "phi4_multimodal": _VISION + " and audio",
    "moss_transcribe_diarize": "a speech model (audio encoder + text decoder)",
    "musicgen": "a text-to-audio model (codebook decoder)",
    "musicgen_melody": "a text-to-audio model",
    "git": "an image-to-text model (a vision encoder feeding a BERT-style decoder)",
    "qwen3_5": _VISION + " (qwen3_5_text)",
    "qwen3_5_moe": _VISION + " (qwen3_5_moe_text)",
    "qwen4_exp": _VISION + " (qwen4_exp_text)",
}
for _family, _why in SHRINK_FAILS.items():
    SKIP[_family] = _SHRINK + _why
for _family in (
    "bert",
    "bert-generation",
    "big_bird",
    "camembert",
    "data2vec-text",
    "electra",
    "ernie",
    "megatron-bert",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "roformer",
    "xlm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xmod",
):
    SKIP[_family] = _ENCODER


def _is_plain(config, name: str) -> bool:
    if isinstance(getattr(type(config), name, None), property):
        return False
    value = getattr(config, name, "absent")
    return value is None or (type(value) is int)


def tiny_config(family: str):
    """The family's default config with tiny sizes, or None for an encoder-decoder family."""
    cls = CONFIG_MAPPING[family]
    base = cls()
    if getattr(base, "is_encoder_decoder", False):
        return None
    towers = [k for k in ("vision_config", "audio_config", "speech_config") if getattr(base, k, None) is not None]
    if towers:
        raise ValueError(f"{family} has {', '.join(towers)}: a multimodal family (see MULTIMODAL)")
    sizes = {k: v for k, v in SIZES.items() if hasattr(base, k) and _is_plain(base, k)}
    if getattr(base, "q_lora_rank", 1) is None:
        sizes.pop("q_lora_rank", None)
    if "kv_lora_rank" in sizes:
        sizes.update(MLA)
    config = cls(**{**sizes, **FIXES.get(family, {})})
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        config.layer_types = list(layer_types[: config.num_hidden_layers])
    return config


MAX_PARAMETERS = 5_000_000  # a tiny config that is not tiny is a test failure, never a machine out of memory


def tiny_family_model(family: str, seed: int = 0):
    import torch

    config = tiny_config(family)
    with torch.device("meta"):  # count first, allocate nothing
        parameters = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise AssertionError(f"{family}: the tiny config still has {parameters:,} parameters")
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()
