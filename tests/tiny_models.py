"""Tiny Hugging Face models for tests: built from a config, tokenizer trained on the fly, saved to disk.

Every builder writes a directory with ``save_pretrained`` (model and tokenizer) and returns its path,
so tests load it through ``--model PATH`` exactly as a user's model. Building takes well under a second.

    path = make_tiny_causal_lm(tmp_path / "lm", texts)               # GPT-2, byte-level BPE
    path = make_tiny_causal_lm(tmp_path / "lm", texts, arch="llama", chat_template=True)
    path = make_tiny_encoder(tmp_path / "enc", texts)                # BERT encoder (AutoModel)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<pad>"
CLS, SEP, MASK, UNK = "[CLS]", "[SEP]", "[MASK]", "[UNK]"

# A minimal chat template: role headers, the content, an end-of-turn marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 256, special_tokens: tuple[str, ...] = (EOS, PAD)
) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (every byte stays encodable)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def make_tiny_causal_lm(
    path: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 400,
    arch: str = "gpt2",
    chat_template: bool = False,
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Save a tiny causal LM (``arch`` "gpt2" or "llama") and its BPE tokenizer to ``path``; return it.

    The tokenizer has BOS = EOS = ``<|endoftext|>`` (as GPT-2) and a separate ``<pad>`` token;
    ``chat_template=True`` adds a small role-tagged template. Dropout is zero so forwards are exact.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    special = (EOS, PAD) + (("<|user|>", "<|assistant|>", "<|system|>", "<|end|>") if chat_template else ())
    backend = train_bpe_tokenizer(texts, vocab_size=vocab_size, special_tokens=special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=max_positions, n_embd=n_embd, n_layer=n_layer,
            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=n_embd, intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            max_position_embeddings=max_positions, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_encoder(
    path: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Save a tiny BERT encoder (loads with ``AutoModel``) and a BPE tokenizer to ``path``; return it."""
    from tokenizers import processors
    from transformers import BertConfig, BertModel

    path = Path(path)
    backend = train_bpe_tokenizer(texts, vocab_size=vocab_size, special_tokens=(PAD, UNK, CLS, SEP, MASK))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, backend.token_to_id(CLS)), (SEP, backend.token_to_id(SEP))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP,
        mask_token=MASK,
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
    )
    model = BertModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- a generated preference task -------------------------------------------------------------------

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "bird", "fish", "star")


def pattern_pairs(n: int, *, seed: int = 0, response_words: int = 4):
    """``n`` pairs (polars frame, canonical columns + pair_id) with a learnable preference.

    The chosen response starts with "yes", the rejected one with "no"; prompts and the rest of
    each response are random words, so only that pattern separates them.
    """
    import random

    import polars as pl

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"q{i % 97} " + " ".join(rng.choice(WORDS) for _ in range(3)) + " ?"
        body = [" ".join(rng.choice(WORDS) for _ in range(response_words - 1)) for _ in range(2)]
        rows.append((prompt, " yes " + body[0], " no " + body[1]))
    prompts, chosen, rejected = zip(*rows, strict=True)
    return pl.DataFrame({
        "prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected),
        "pair_id": [f"p{seed}-{i:05d}" for i in range(n)],
    })


def pattern_texts() -> list[str]:
    """Training text for the tokenizer of ``pattern_pairs`` models."""
    words = " ".join(WORDS)
    return [f"{words} yes no ? {words} yes no", *(f"q{i} ?" for i in range(97))] * 3
