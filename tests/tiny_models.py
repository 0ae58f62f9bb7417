"""Tiny random-weight HF models built offline (Llama, GPT-2, GPT-NeoX, BERT) with a tiny BPE tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "gpt2", "gpt_neox", "bert")

SENTENCES = [
    "Once upon a time there was a little fox who lived in the woods.",
    "The fox liked to run and jump over the logs near the river.",
    "One day she met a bear, and the bear said hello to the fox.",
    "They became friends and played together every single morning.",
    "The quick brown dog jumps over the lazy cat; 12345 67890!",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
]


def make_tiny_tokenizer(add_bos: bool = False) -> Any:
    """A byte-level BPE (vocab ~300) trained in memory, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None)


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A 2-4 layer, 32-64 wide config of the given architecture."""
    import transformers as T

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=128, **ids)
    elif arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, max_position_embeddings=128, **ids)
    elif arch == "bert":
        cfg = T.BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=128, pad_token_id=0)
    else:
        raise ValueError(f"unknown tiny arch {arch!r} (choose from {', '.join(ARCHS)})")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_model(arch: str, tmp_path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Build and save_pretrained a tiny random model + tokenizer into ``tmp_path/arch``; returns the folder."""
    import transformers as T

    out = Path(tmp_path) / (arch + ("-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items())) if overrides else ""))
    if (out / "config.json").is_file():
        return out
    tok = make_tiny_tokenizer(add_bos=(arch == "llama"))
    cfg = tiny_config(arch, len(tok), **overrides)
    torch.manual_seed(seed)
    cls = {"llama": T.LlamaForCausalLM, "gpt2": T.GPT2LMHeadModel, "gpt_neox": T.GPTNeoXForCausalLM,
           "bert": T.BertModel}[arch]
    model = cls(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
