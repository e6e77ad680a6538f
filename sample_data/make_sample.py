"""Regenerate sample_data/pairs.parquet: 400 preference pairs with a known true reward.

Each response has 16 latent attributes a ~ N(0, 1) (stored as `*_features`); its true reward is
s = w · a with the fixed weights W below (stored as `*_score`). The text is written from the first
four attributes (on-topic detail, politeness, hedging, and a rambling tail), so text models can learn
the reward too. In every pair `chosen` is the response with the higher true reward: labels are clean.

    python sample_data/make_sample.py            # writes sample_data/pairs.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl

ROWS = 400
DIM = 16
SEED = 20250531
# Weights of the true reward: the four attributes the text shows dominate; the rest are small.
W = np.array([1.5, 1.0, -0.8, -0.6] + [0.25, -0.25] * 6)

TOPICS = [
    ("sourdough bread", "keep the starter warm and feed it daily", "bake at a high heat with steam"),
    ("a job interview", "research the company beforehand", "prepare two questions of your own"),
    ("learning Python", "write small programs every day", "read other people's code"),
    ("a first marathon", "build mileage slowly", "practise eating during long runs"),
    ("houseplants", "water only when the soil is dry", "give them bright indirect light"),
    ("saving money", "automate a transfer on payday", "track every expense for a month"),
    ("sleeping better", "keep a fixed wake-up time", "avoid screens before bed"),
    ("public speaking", "rehearse out loud", "slow down and pause between points"),
    ("a trip to Japan", "buy a rail pass before arriving", "carry some cash"),
    ("home coffee", "grind the beans just before brewing", "weigh the water and the coffee"),
]
ASKS = [
    "What should I know about {t}?",
    "Any advice on {t}?",
    "How do I get started with {t}?",
    "Can you help me with {t}?",
]


def response_text(rng: np.random.Generator, topic: tuple[str, str, str], a: np.ndarray) -> str:
    """Write a response whose visible qualities follow attributes a[0..3]."""
    name, tip1, tip2 = topic
    parts = []
    if a[1] > 0.3:
        parts.append(rng.choice(["Thanks for asking!", "Happy to help.", "Great question."]))
    if a[0] > -0.5:
        parts.append(f"For {name}, {tip1}.")
    if a[0] > 0.7:
        parts.append(f"It also helps to {tip2}.")
    if a[0] <= -0.5:
        parts.append(rng.choice(["It depends.", "Hard to say.", "There are many opinions on that."]))
    if a[2] > 0.5:
        parts.append(rng.choice(["I might be wrong, though.", "But I'm not really sure."]))
    if a[3] > 0.6:
        parts.append(rng.choice(["Anyway, the weather has been odd lately.", "By the way, I like turtles."]))
    if a[1] < -0.8:
        parts.append("Figure out the rest yourself.")
    return " ".join(parts)


def make_pairs(rows: int = ROWS, seed: int = SEED) -> pl.DataFrame:
    """Generate the sample pairs (clean labels, chosen = higher true reward)."""
    rng = np.random.default_rng(seed)
    records = []
    while len(records) < rows:
        topic = TOPICS[rng.integers(len(TOPICS))]
        prompt = ASKS[rng.integers(len(ASKS))].format(t=topic[0])
        a, b = rng.standard_normal((2, DIM))
        text_a, text_b = response_text(rng, topic, a), response_text(rng, topic, b)
        score_a, score_b = float(W @ a), float(W @ b)
        if text_a == text_b or abs(score_a - score_b) < 1e-6:
            continue
        if score_b > score_a:
            (text_a, a, score_a), (text_b, b, score_b) = (text_b, b, score_b), (text_a, a, score_a)
        records.append(
            {
                "prompt": prompt,
                "chosen": text_a,
                "rejected": text_b,
                "chosen_score": score_a,
                "rejected_score": score_b,
                "chosen_features": a.astype(np.float32).tolist(),
                "rejected_features": b.astype(np.float32).tolist(),
            }
        )
    return pl.DataFrame(records).with_columns(
        pl.col("chosen_features", "rejected_features").cast(pl.Array(pl.Float32, DIM))
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prefnoise.data import new_history_entry, read_table, write_table

    out = Path(__file__).with_name("pairs.parquet")
    frame = make_pairs()
    tmp = out.with_suffix(".raw.parquet")
    frame.write_parquet(tmp)
    canonical = read_table(tmp)
    tmp.unlink()
    entry = new_history_entry("make_sample", {"rows": ROWS, "dim": DIM, "weights": W.tolist()}, seed=SEED)
    write_table(canonical, out, entry=entry, history=[])
    print(f"wrote {canonical.height} pairs to {out}")
