"""Tiny random causal LMs built from transformers configs, with a real (tiny) BPE tokenizer.

No hub is needed: the tokenizer is trained on a slice of WikiText-2 from the shared data
(tests/support/paths.py; a built-in paragraph when that is missing), the weights are random.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.support.paths import WIKITEXT_VALID

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. SparseGPT prunes large language models "
    "in one shot without retraining, layer by layer, using second order information. "
) * 50

ARCHS = ("llama", "opt", "bloom", "gpt2", "gpt_neox")
MORE_ARCHS = ("mistral", "qwen2", "gemma", "phi", "falcon")  # the other families of the adapter
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen2_moe")  # fused 3-D experts (worker.engine.moe)


def sample_text(chars: int = 60_000) -> str:
    """A slice of real English text for tokenizers and calibration files."""
    if WIKITEXT_VALID.exists():
        return WIKITEXT_VALID.read_text(encoding="utf-8")[:chars]
    # No shared data (a clone elsewhere): the fallback's words in a fixed pseudo-random order,
    # as long as asked, so that files cut from it at any offset hold text.
    words = _FALLBACK_TEXT.split()
    rng = random.Random(0)
    out: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 18))).capitalize() + "."
        out.append(sentence)
        size += len(sentence) + 1
    return " ".join(out)[:chars]


def make_tokenizer(vocab_size: int = 384) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([sample_text()], trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def make_config(arch: str, vocab_size: int, hidden: int = 64, blocks: int = 2, context: int = 256):
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden + 32,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=context,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden + 32,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            word_embed_proj_dim=hidden,
            max_position_embeddings=context,
            **common,
        )
    if arch == "bloom":
        return transformers.BloomConfig(hidden_size=hidden, n_layer=blocks, n_head=4, **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=blocks, n_head=4, n_positions=context, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden + 32,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            max_position_embeddings=context,
            **common,
        )
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden + 32,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        **common,
    )
    if arch == "mistral":
        return transformers.MistralConfig(**llama_like)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=16, **llama_like)
    if arch == "phi":
        return transformers.PhiConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden + 32,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            max_position_embeddings=context,
            **common,
        )
    moe = dict(
        hidden_size=hidden,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        **common,
    )
    if arch == "mixtral":  # 4 experts, 2 per token
        return transformers.MixtralConfig(
            intermediate_size=hidden + 32, num_local_experts=4, num_experts_per_tok=2, **moe
        )
    if arch == "qwen3_moe":  # every block sparse, no shared expert
        return transformers.Qwen3MoeConfig(
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden + 32,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            **moe,
        )
    if arch == "qwen2_moe":  # with a shared expert and its gate
        return transformers.Qwen2MoeConfig(
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden + 32,
            shared_expert_intermediate_size=hidden + 64,
            num_experts=4,
            num_experts_per_tok=2,
            **moe,
        )
    if arch == "llama4_text":  # Llama 4's experts: inputs scaled by the router, one bmm; a shared expert
        return transformers.Llama4TextConfig(
            intermediate_size=hidden + 32,
            intermediate_size_mlp=2 * hidden,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
            head_dim=16,
            **moe,
        )
    if arch == "falcon":
        return transformers.FalconConfig(
            hidden_size=hidden,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            **common,
        )
    raise ValueError(
        f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS + MORE_ARCHS + MOE_ARCHS)}, llama4_text"
    )


def make_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Save a 2-block random ``arch`` model and its tokenizer in ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    config = make_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
