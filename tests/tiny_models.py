"""Tiny Hugging Face models for tests: built from a config, tokenizer trained on the fly, saved to disk.

The causal LM, its tokenizer and the generated tasks live in ``prefnoise.experiments.tiny_lm`` (the
``reproduce alignment`` experiment uses them too); this module re-exports them and adds a tiny
encoder. Every builder writes a directory with ``save_pretrained`` and returns its path, so tests
load it through ``--model PATH`` exactly as a user's model. Building takes well under a second.

    path = make_tiny_causal_lm(tmp_path / "lm", texts)               # GPT-2, byte-level BPE
    path = make_tiny_causal_lm(tmp_path / "lm", texts, arch="llama", chat_template=True)
    path = make_tiny_encoder(tmp_path / "enc", texts)                # BERT encoder (AutoModel)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from prefnoise.experiments.tiny_lm import (  # noqa: F401  (re-exported for the tests)
    CHAT_TEMPLATE,
    EOS,
    PAD,
    WORDS,
    make_tiny_causal_lm,
    pattern_pairs,
    pattern_texts,
    quality_pairs,
    quality_texts,
    train_bpe_tokenizer,
)

CLS, SEP, MASK, UNK = "[CLS]", "[SEP]", "[MASK]", "[UNK]"


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


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the previous count.

    Tiny models gain nothing from threads, and on a shared, loaded machine every small op then
    waits for a descheduled thread (milliseconds each): one thread makes these tests ~4x faster.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
