"""A tiny causal LM with a BPE tokenizer trained on the fly, and generated preference tasks for it.

Nothing here touches the network: the tokenizer is trained on the task's own words, the model is
built from a config with random weights, and both are written with ``save_pretrained`` so that
``prefnoise align --model PATH`` loads them like a user's model.

    path = make_tiny_causal_lm(out / "lm", quality_texts())        # GPT-2, byte-level BPE
    frame = quality_pairs(400, seed=0)                             # canonical pairs + true scores

Two tasks:
- ``pattern_pairs``: the chosen response starts with "yes", the rejected with "no" (one strong,
  easily learned token; for checks that learning happens at all).
- ``quality_pairs``: each response is a string of words, some "good" and some "bad"; its true
  quality is the number of good words, and the chosen response has the higher quality. The signal
  is spread over several tokens with small per-pair gaps, and only some words carry it, so
  a policy must learn many weak features: the setting where flipped labels can pull DPO's
  unbounded loss away from the truth while a bounded symmetric loss stops chasing them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from prefnoise import columns as C
from prefnoise.hf import quiet_transformers

EOS = "<|endoftext|>"
PAD = "<pad>"

# A minimal chat template: role headers, the content, an end-of-turn marker.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 256, special_tokens: tuple[str, ...] = (EOS, PAD)):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (every byte stays encodable)."""
    # tokenizers: loaded only when a tokenizer is trained
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    seed: int = C.DEFAULT_SEED,
) -> Path:
    """Save a tiny causal LM (``arch`` "gpt2" or "llama") and its BPE tokenizer to ``path``; return the path.

    The tokenizer has BOS = EOS = ``<|endoftext|>`` (as GPT-2) and a separate ``<pad>`` token;
    ``chat_template=True`` adds a small role-tagged template. Dropout is zero so forwards are exact.
    """
    import torch  # torch is heavy: loaded only when a model runs

    # transformers is heavy: loaded only when a model is read
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    special = (EOS, PAD) + (CHAT_TOKENS if chat_template else ())
    backend = train_bpe_tokenizer(texts, vocab_size=vocab_size, special_tokens=special)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=None)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=2 * n_embd,
                             num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                             max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', not {arch!r}")
    path.mkdir(parents=True, exist_ok=True)

    with quiet_transformers():  # no "Writing model shards" bar
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- generated preference tasks ----------------------------------------------------------------

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "bird", "fish", "star")


def pattern_pairs(n: int, *, seed: int = C.DEFAULT_SEED, response_words: int = 4) -> pl.DataFrame:
    """``n`` pairs (canonical columns + pair_id): the chosen response starts with "yes", the rejected with "no".

    Prompts and the rest of each response are random words, so only that pattern separates them.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"q{i % 97} " + " ".join(rng.choice(WORDS) for _ in range(3)) + " ?"
        body = [" ".join(rng.choice(WORDS) for _ in range(response_words - 1)) for _ in range(2)]
        rows.append((prompt, " yes " + body[0], " no " + body[1]))
    prompts, chosen, rejected = zip(*rows, strict=True)
    return pl.DataFrame({
        C.PROMPT: list(prompts), C.CHOSEN: list(chosen), C.REJECTED: list(rejected),
        C.PAIR_ID: [f"p{seed}-{i:05d}" for i in range(n)],
    })


def pattern_texts() -> list[str]:
    """Training text for the tokenizer of ``pattern_pairs`` models."""
    words = " ".join(WORDS)
    return [f"{words} yes no ? {words} yes no", *(f"q{i} ?" for i in range(97))] * 3


GOOD_WORDS = ("apt", "bold", "calm", "deft", "fair", "glad", "kind", "neat")
BAD_WORDS = ("arid", "blunt", "crude", "dull", "faint", "gruff", "lax", "numb")
FILLER_WORDS = WORDS
TOPICS = 50


def quality_pairs(
    n: int,
    *,
    seed: int = C.DEFAULT_SEED,
    response_words: int = 8,
    graded_share: float = 0.5,
    max_gap: int = 2,
    first_better_column: str | None = "first_better",
) -> pl.DataFrame:
    """``n`` pairs whose true preference is spread over several weak word-level features.

    Each response has ``response_words`` words; a share ``graded_share`` of them are graded
    (good or bad), the rest neutral filler. Quality = good words − bad words; the two responses of
    a pair differ in quality by 1..``max_gap``, and the better one is ``chosen`` (clean labels).
    Columns: prompt, chosen, rejected, pair_id, chosen_score/rejected_score (true quality) and,
    when ``first_better_column`` is set, a random per-pair bool for class-conditional noise.
    """
    rng = random.Random(seed)
    graded = max(1, round(response_words * graded_share))

    def response(good: int) -> tuple[str, int]:
        words = [rng.choice(GOOD_WORDS) for _ in range(good)]
        words += [rng.choice(BAD_WORDS) for _ in range(graded - good)]
        words += [rng.choice(FILLER_WORDS) for _ in range(response_words - graded)]
        rng.shuffle(words)
        return " " + " ".join(words), 2 * good - graded

    rows = []
    for _ in range(n):
        prompt = f"t{rng.randrange(TOPICS)} " + " ".join(rng.choice(FILLER_WORDS) for _ in range(2)) + " ?"
        gap = rng.randint(1, min(max_gap, graded))
        low = rng.randint(0, graded - gap)
        better, better_score = response(low + gap)
        worse, worse_score = response(low)
        rows.append((prompt, better, worse, float(better_score), float(worse_score)))
    prompts, chosen, rejected, chosen_score, rejected_score = zip(*rows, strict=True)
    frame = pl.DataFrame({
        C.PROMPT: list(prompts), C.CHOSEN: list(chosen), C.REJECTED: list(rejected),
        C.PAIR_ID: [f"q{seed}-{i:05d}" for i in range(n)],
        C.chosen(C.SCORE): list(chosen_score), C.rejected(C.SCORE): list(rejected_score),
    })
    if first_better_column:
        frame = frame.with_columns(pl.Series(first_better_column, [rng.random() < 0.5 for _ in range(n)]))
    return frame


def quality_texts() -> list[str]:
    """Training text for the tokenizer of ``quality_pairs`` models (every word, every topic)."""
    words = " ".join((*GOOD_WORDS, *BAD_WORDS, *FILLER_WORDS))
    return [f"{words} ? {words}", *(f"t{i} ?" for i in range(TOPICS))] * 3
