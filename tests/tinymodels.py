"""Tiny random causal LMs (Llama, Qwen2, Qwen3) with a small trained tokenizer, built in seconds.

The tokenizer is a byte-level BPE trained on the shipped math problems, with ChatML specials and
``<think>``/``</think>`` as added tokens, and a Qwen3-style chat template whose generation prompt can
pre-fill ``<think>``. Weights are random but deterministic (seed 0), saved as bf16 safetensors.
``vocab=N`` grows the vocabulary to N tokens (Gemma 3's 262k, Llama 3's 128k) with merges of trained tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's template, reduced to what matters for tests: system, multi-turn, think blocks, generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and '</think>' in message['content'] %}"
    "{{- message['content'].split('</think>')[-1].lstrip('\\n') }}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split, so the fixture tokenizes like a real Qwen model does.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _corpus() -> list[str]:
    data = Path(__file__).resolve().parents[1] / "grpoctl" / "data" / "arith_gsm.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    extra = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
             "You are a helpful assistant. Think step by step.", "Aku berpikir kalau aku adalah kamu.",
             "Hello, how are you today? I am fine, thank you."]
    return [r["question"] + "\n" + r["answer"] for r in rows] + extra * 20


BOS = "<bos>"


def _grown(tok, size: int):
    """``tok`` with merges of pairs of its trained tokens appended until it has ``size`` tokens: a vocabulary as big
    as a real model's, still a valid byte-level BPE (every new token is the merge of two existing ones, ranked after
    the trained merges) that transformers and llama.cpp tokenize alike."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    vocab, merges = model["vocab"], model["merges"]
    specials = {t["content"] for t in spec["added_tokens"]}
    trained = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    pairs = ((a, b) for a in trained for b in trained)
    while len(vocab) < size:
        a, b = next(pairs)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
    return Tokenizer.from_str(json.dumps(spec))


def build_tokenizer(out: Path, vocab_size: int = 800, chat_template: bool = True, bos: bool = False,
                    vocab: int | None = None):
    """The fixture tokenizer, saved to ``out``; ``chat_template=False``: without a chat template, as many base
    (not instruct) models ship; ``bos``: a BOS token that the tokenizer adds to text itself and the chat template
    writes too (Gemma, Llama 3): a server that tokenizes the rendered prompt with the BOS added must not send two;
    ``vocab``: the vocabulary grown to that many tokens (``_grown``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ([BOS] if bos else []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if vocab is not None:
        tok = _grown(tok, vocab)
    if bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS if bos else None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    if chat_template:
        fast.chat_template = ("{{- bos_token }}" if bos else "") + CHAT_TEMPLATE
    fast.save_pretrained(out)
    if bos:  # as Gemma's and Llama 3's tokenizer_config.json say it; llama.cpp's converter reads it from here
        config_file = Path(out) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["add_bos_token"] = True
        config_file.write_text(json.dumps(config, indent=2))
    return fast


def build_tiny_model(out: Path, arch: str = "qwen3", seed: int = 0, tied: bool = False,
                     chat_template: bool = True, bos: bool = False, vocab: int | None = None,
                     head_scale: float = 1.0) -> Path:
    """Write a tiny random ``arch`` (llama | qwen2 | qwen3) model with the fixture tokenizer to ``out``;
    ``tied``: lm_head shares the input embedding (tie_word_embeddings, no lm_head.weight saved);
    ``chat_template=False``: its tokenizer has none (a base model); ``bos``: the tokenizer adds a BOS and the
    chat template writes it (``build_tokenizer``); ``vocab``: that many tokens (``build_tokenizer``);
    ``head_scale``: the output head (with ``tied``, the shared embedding, whose scale the first norm undoes for
    the input) multiplied by it, so that random weights still give a confident argmax over a big vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config, Qwen3Config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, chat_template=chat_template, bos=bos, vocab=vocab)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.1, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=tied)
    if arch == "llama":
        config = LlamaConfig(**common, rms_norm_eps=1e-5)
    elif arch == "qwen2":
        config = Qwen2Config(**common, rms_norm_eps=1e-6)
    elif arch == "qwen3":
        config = Qwen3Config(**common, head_dim=16, rms_norm_eps=1e-6)
    else:
        raise ValueError(f"unknown tiny arch {arch}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id,
                                               do_sample=True, temperature=0.7, top_p=0.95)
    model.save_pretrained(out, safe_serialization=True)
    return out
