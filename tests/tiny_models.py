"""Tiny random-weight HF models built offline.

* ``make_tiny_model(arch, dir)``: Llama, GPT-2, GPT-NeoX or BERT saved with a tiny BPE tokenizer (for load_model);
* ``tiny_model(variant)``: one of ``VARIANTS`` (every architecture the site rules cover, with the config variants
  that change its block), built in memory for the architecture tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ARCHS = ("llama", "gpt2", "gpt_neox", "bert")

SENTENCES = [
    "Once upon a time there was a little fox who lived in the woods.",
    "The fox liked to run and jump over the logs near the river.",
    "One day she met a bear, and the bear said hello to the fox.",
    "They became friends and played together every single morning.",
    "The quick brown dog jumps over the lazy cat; 12345 67890!",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
]


def make_tiny_tokenizer(add_bos: bool = False) -> T.PreTrainedTokenizerFast:
    """A byte-level BPE (vocab ~300) trained in memory, wrapped as PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None)


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> T.PretrainedConfig:
    """A 2-4 layer, 32-64 wide config of the given architecture."""
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


# ---------------------------------------------------------------- every covered architecture, in memory

D, HEADS, KV, D_HEAD, D_MLP, N_LAYERS, VOCAB = 32, 4, 2, 8, 48, 2, 64
_LLAMA_LIKE = dict(hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV, max_position_embeddings=64)
_ENCODER = dict(hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=64)


@dataclass(frozen=True)
class Variant:
    """A tiny config of one architecture: its model_type, config fields, and what it stands for."""

    model_type: str
    config: dict = field(default_factory=dict)
    encoder: bool = False
    like: str = ""  # the real models this variant stands for


VARIANTS: dict[str, Variant] = {
    "llama": Variant("llama", _LLAMA_LIKE, like="Llama 2/3, TinyLlama"),
    "mistral": Variant("mistral", _LLAMA_LIKE, like="Mistral 7B"),
    "qwen2": Variant("qwen2", _LLAMA_LIKE, like="Qwen2, Qwen2.5"),
    "qwen3": Variant("qwen3", {**_LLAMA_LIKE, "head_dim": D_HEAD}, like="Qwen3"),
    "gemma": Variant("gemma", {**_LLAMA_LIKE, "head_dim": D_HEAD}, like="Gemma"),
    "phi3": Variant("phi3", _LLAMA_LIKE, like="Phi-3, Phi-4"),
    "olmo": Variant("olmo", _LLAMA_LIKE, like="OLMo"),
    "smollm3": Variant("smollm3", _LLAMA_LIKE, like="SmolLM3"),
    "granite": Variant("granite", {**_LLAMA_LIKE, "residual_multiplier": 0.22, "embedding_multiplier": 12.0},
                       like="Granite 3"),
    "starcoder2": Variant("starcoder2", _LLAMA_LIKE, like="StarCoder2"),
    "cohere": Variant("cohere", _LLAMA_LIKE, like="Command R"),
    "stablelm": Variant("stablelm", {**_LLAMA_LIKE, "use_parallel_residual": False}, like="StableLM 2"),
    "stablelm_parallel": Variant("stablelm", {**_LLAMA_LIKE, "use_parallel_residual": True}, like="StableLM (parallel)"),
    "mixtral": Variant("mixtral", {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2}, like="Mixtral 8x7B"),
    "qwen2_moe": Variant("qwen2_moe", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                       "shared_expert_intermediate_size": 40, "mlp_only_layers": [0]},
                         like="Qwen1.5-MoE (layer 0 dense)"),
    "qwen3_moe": Variant("qwen3_moe", {**_LLAMA_LIKE, "head_dim": D_HEAD, "num_experts": 4, "num_experts_per_tok": 2,
                                       "moe_intermediate_size": 24}, like="Qwen3-MoE"),
    "olmoe": Variant("olmoe", {**_LLAMA_LIKE, "num_experts": 4, "num_experts_per_tok": 2}, like="OLMoE"),
    "gemma2": Variant("gemma2", {**_LLAMA_LIKE, "head_dim": D_HEAD}, like="Gemma 2"),
    "gemma3_text": Variant("gemma3_text", {**_LLAMA_LIKE, "head_dim": D_HEAD}, like="Gemma 3 (text)"),
    "olmo2": Variant("olmo2", _LLAMA_LIKE, like="OLMo 2"),
    "gpt2": Variant("gpt2", dict(n_embd=D, n_layer=N_LAYERS, n_head=HEADS, n_positions=64), like="GPT-2"),
    "gpt_neo": Variant("gpt_neo", dict(hidden_size=D, num_layers=N_LAYERS, num_heads=HEADS, max_position_embeddings=64,
                                       attention_types=[[["global", "local"], 1]], window_size=4), like="GPT-Neo, TinyStories"),
    "gpt_neox": Variant("gpt_neox", dict(hidden_size=D, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                         num_attention_heads=HEADS, max_position_embeddings=64), like="Pythia, GPT-NeoX-20B"),
    "gpt_neox_seq": Variant("gpt_neox", dict(hidden_size=D, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                             num_attention_heads=HEADS, max_position_embeddings=64,
                                             use_parallel_residual=False), like="GPT-NeoX (sequential)"),
    "gptj": Variant("gptj", dict(n_embd=D, n_layer=N_LAYERS, n_head=HEADS, n_positions=64, rotary_dim=4), like="GPT-J 6B"),
    "phi": Variant("phi", {**_LLAMA_LIKE, "num_key_value_heads": HEADS}, like="Phi-1.5, Phi-2"),
    "falcon": Variant("falcon", dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS, multi_query=True,
                                     parallel_attn=True), like="Falcon 7B"),
    "falcon_new": Variant("falcon", dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                                         new_decoder_architecture=True, num_kv_heads=KV), like="Falcon 40B/180B"),
    "falcon_seq": Variant("falcon", dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                                         multi_query=False, parallel_attn=False), like="Falcon (sequential)"),
    "falcon_alibi": Variant("falcon", dict(hidden_size=D, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                                           multi_query=False, parallel_attn=True, alibi=True), like="Falcon-RW"),
    "opt": Variant("opt", dict(hidden_size=D, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                               word_embed_proj_dim=D, max_position_embeddings=64), like="OPT-125m ... 66B"),
    "opt_350m": Variant("opt", dict(hidden_size=D, ffn_dim=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=HEADS,
                                    word_embed_proj_dim=16, max_position_embeddings=64, do_layer_norm_before=False),
                        like="OPT-350m (post-LN, projected embeddings)"),
    "bert": Variant("bert", _ENCODER, encoder=True, like="BERT"),
    "roberta": Variant("roberta", _ENCODER, encoder=True, like="RoBERTa"),
    "xlm-roberta": Variant("xlm-roberta", _ENCODER, encoder=True, like="XLM-R"),
    "electra": Variant("electra", {**_ENCODER, "embedding_size": 16}, encoder=True, like="ELECTRA (projected embeddings)"),
    "mpnet": Variant("mpnet", _ENCODER, encoder=True, like="MPNet, all-mpnet-base-v2"),
    "deberta-v2": Variant("deberta-v2", {**_ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                         "position_biased_input": False, "type_vocab_size": 0}, encoder=True,
                          like="DeBERTa-v3"),
    "distilbert": Variant("distilbert", dict(dim=D, hidden_dim=D_MLP, n_layers=N_LAYERS, n_heads=HEADS,
                                             max_position_embeddings=64), encoder=True, like="DistilBERT"),
    "modernbert": Variant("modernbert", {**_ENCODER, "cls_token_id": 1, "sep_token_id": 2, "global_attn_every_n_layers": 2,
                                         "local_attention": 4}, encoder=True, like="ModernBERT"),
}


def tiny_model(variant: str, seed: int = 0, attn: str | None = None) -> T.PreTrainedModel:
    """A tiny random-weight model of one VARIANTS entry, in eval mode (same seed: same weights).

    ``attn``: the attention implementation (default: the library's choice, sdpa where supported).
    """
    v = VARIANTS[variant]
    cfg = T.AutoConfig.for_model(v.model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **v.config)
    torch.manual_seed(seed)
    cls = T.AutoModel if v.encoder else T.AutoModelForCausalLM
    return cls.from_config(cfg, **({"attn_implementation": attn} if attn else {})).eval()
