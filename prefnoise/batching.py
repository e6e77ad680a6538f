"""Which training examples go into which micro-batch: a pure, seeded sampler shared by align and fit-reward.

Modes (``BATCHING_MODES``):

* ``exact``: the epoch's seeded permutation cut into batches of ``batch_size`` in order, the rows that do
  not fill a last batch left out of that epoch (the order align always used; kept for loss-parity tests).
* ``group``: as transformers' ``group_by_length`` (``get_length_grouped_indices``): the epoch's
  permutation is cut into megabatches of ``MEGABATCH`` × ``batch_size`` examples, each megabatch is
  sorted by length (longest first), cut into batches, and the batches are shuffled. Similar lengths share
  a batch, so little of each batch is padding. Every example is used exactly once per epoch.
* ``group`` with a token budget (``max_tokens``): inside each sorted megabatch, batches are filled
  greedily while their padded size (rows × the longest row's length) stays ≤ ``max_tokens``; a batch
  therefore holds a varying number of examples. An example longer than the budget alone trains alone.

The length of a preference pair is that of its longer side (prompt + the longer response): chosen and
rejected are padded together to one width in one forward pass, so a batch of ``n`` pairs of width ``w``
costs ``2·n·w`` padded tokens (``pair_rows=2``). A reward model scores each side separately but in one
batch too, so the same rule holds there.

Everything is a pure function of (lengths, options, seed, epoch): the same call gives the same batches.
Under data parallelism (``processes`` P) a *global* micro-batch is a list of P per-process batches; in
``exact`` and fixed-size ``group`` mode those are consecutive slices of ``batch_size`` rows of one global
batch of P·``batch_size`` rows, as before; with a budget they are P consecutive (similar-length)
budgeted batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BATCHING_MODES = ("exact", "group")
MEGABATCH = 50  # batches per megabatch, as transformers' get_length_grouped_indices


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits ``n`` examples (a pure function of seed, epoch)."""
    import torch  # torch is heavy: loaded only when a model runs

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _batch_shuffle(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded order of ``n`` batches in epoch ``epoch`` (a stream apart from ``epoch_permutation``'s)."""
    rng = np.random.default_rng([seed, epoch, 0x6261])
    return rng.permutation(n).tolist()


def pair_length(prompt: int, chosen: int, rejected: int) -> int:
    """Padded width of a preference pair: prompt plus its longer response (both sides share one width)."""
    return prompt + max(chosen, rejected)


def padded_tokens(lengths: Sequence[int], rows_per_example: int = 2) -> int:
    """Tokens a batch of examples with ``lengths`` occupies once padded: rows × the longest length."""
    return rows_per_example * len(lengths) * max(lengths, default=0)


def _sorted_megabatches(lengths: Sequence[int], megabatch: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's permutation cut into megabatches of ``megabatch`` examples, each sorted longest first."""
    perm = epoch_permutation(len(lengths), seed, epoch)
    # sorted() is stable: equal lengths keep their random order
    return [sorted(perm[i:i + megabatch], key=lambda j: -lengths[j]) for i in range(0, len(perm), megabatch)]


def exact_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """``exact`` mode: the permutation in consecutive batches; the ``n % batch_size`` last rows sit out."""
    perm = epoch_permutation(n, seed, epoch)
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def group_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  megabatch: int = MEGABATCH) -> list[list[int]]:
    """``group`` mode: batches of ``batch_size`` similar-length examples (the last one smaller), shuffled.

    Every index of ``lengths`` appears exactly once.
    """
    return group_order(epoch_permutation(len(lengths), seed, epoch), lengths, batch_size, seed, epoch, megabatch)


def group_order(order: Sequence[int], lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                megabatch: int = MEGABATCH) -> list[list[int]]:
    """``group`` mode over a given (already shuffled) ``order`` of indices into ``lengths``: megabatches of
    ``megabatch × batch_size`` in that order, each sorted longest first, cut into batches, shuffled."""
    size = megabatch * batch_size
    flat = [j for i in range(0, len(order), size) for j in sorted(order[i:i + size], key=lambda j: -lengths[j])]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    return [batches[i] for i in _batch_shuffle(len(batches), seed, epoch)]


def longest_first(index: Sequence[int], lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of ``index`` sorted longest first (for passes whose order does not matter: scoring)."""
    ordered = sorted(index, key=lambda j: -lengths[j])
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def budget_batches(lengths: Sequence[int], max_tokens: int, megabatch_examples: int, seed: int, epoch: int,
                   rows_per_example: int = 2, shuffle: bool = True) -> list[list[int]]:
    """``group`` mode with a token budget: within each sorted megabatch, batches whose padded size
    (``padded_tokens``) is at most ``max_tokens``; an example alone over the budget forms its own batch.

    Every index of ``lengths`` appears exactly once. ``shuffle=False`` keeps the longest-first order.
    """
    batches: list[list[int]] = []
    for mega in _sorted_megabatches(lengths, megabatch_examples, seed, epoch):
        current: list[int] = []
        for j in mega:  # longest first: the batch's first example sets its width
            width = lengths[current[0]] if current else lengths[j]
            if current and rows_per_example * (len(current) + 1) * width > max_tokens:
                batches.append(current)
                current = []
            current.append(j)
        if current:
            batches.append(current)
    if not shuffle:
        return batches
    return [batches[i] for i in _batch_shuffle(len(batches), seed, epoch)]


def split_to_multiple(batches: list[list[int]], processes: int) -> list[list[int]]:
    """Split the largest batches in two (each half in place of the original) until their count is a
    multiple of ``processes``; ValueError when there are fewer than ``processes`` examples in all."""
    batches = [list(b) for b in batches]
    while len(batches) % processes:
        i = max(range(len(batches)), key=lambda k: (len(batches[k]), -k))
        if len(batches[i]) < 2:
            raise ValueError(f"{sum(map(len, batches))} examples cannot fill {processes} processes")
        half = (len(batches[i]) + 1) // 2
        batches[i:i + 1] = [batches[i][:half], batches[i][half:]]
    return batches


def epoch_batches(lengths: Sequence[int], *, batch_size: int, mode: str = "group", max_tokens: int | None = None,
                  seed: int = 0, epoch: int = 0, processes: int = 1, rows_per_example: int = 2,
                  megabatch: int = MEGABATCH) -> list[list[list[int]]]:
    """The global micro-batches of epoch ``epoch``: each a list of ``processes`` per-process batches
    of indices into ``lengths``.

    ``exact``: today's order (``exact_batches`` of ``processes·batch_size``, sliced per process);
    ``group``: ``group_batches`` (or ``budget_batches`` when ``max_tokens`` is set). Every example
    appears exactly once per epoch except in ``exact`` mode, which leaves out the rows that do not
    fill a last global batch.
    """
    if mode not in BATCHING_MODES:
        raise ValueError(f"batching mode must be one of {', '.join(BATCHING_MODES)}, not {mode!r}")
    n, p, b = len(lengths), processes, batch_size
    if n < p:
        raise ValueError(f"{n} examples cannot fill {p} processes")
    if mode == "exact":
        if max_tokens is not None:
            raise ValueError("a token budget needs group batching")
        return [[g[r * b:(r + 1) * b] for r in range(p)] for g in exact_batches(n, b * p, seed, epoch)]
    if max_tokens is not None:
        # budgeted per-process batches, grouped P at a time in length order, then shuffled
        local = budget_batches(lengths, max_tokens, megabatch * b * p, seed, epoch, rows_per_example, shuffle=False)
        local = split_to_multiple(local, p)
        groups = [local[i:i + p] for i in range(0, len(local), p)]
        return [groups[i] for i in _batch_shuffle(len(groups), seed, epoch)]
    groups = []
    for g in group_batches(lengths, b * p, seed, epoch, megabatch):
        if len(g) == b * p:
            groups.append([g[r * b:(r + 1) * b] for r in range(p)])
        else:  # the last, smaller global batch: P near-equal consecutive parts
            groups.append(_near_equal_parts(g, p))
    if p > 1 and any(not part for group in groups for part in group):
        # fewer than P rows left over: hand them to the parts of another global batch
        short = next(i for i, group in enumerate(groups) if any(not part for part in group))
        rest = [j for part in groups.pop(short) for j in part]
        target = groups[0]
        for r, j in enumerate(rest):
            target[r].append(j)
    return groups


def _near_equal_parts(rows: list[int], parts: int) -> list[list[int]]:
    """``rows`` in ``parts`` consecutive pieces whose sizes differ by at most one (larger ones first)."""
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for r in range(parts):
        stop = start + size + (r < extra)
        out.append(rows[start:stop])
        start = stop
    return out


class BatchSchedule:
    """Global micro-batches over epochs, as one sequence numbered from 0: a pure function of its options.

    Epochs are computed when first needed and kept. ``locate(k)`` gives (epoch, global micro-batch);
    ``micro_batches(epochs)`` the count in the first ``epochs`` epochs.
    """

    def __init__(self, lengths: Sequence[int], *, batch_size: int, mode: str, max_tokens: int | None, seed: int,
                 processes: int = 1, rows_per_example: int = 2) -> None:
        self.lengths = list(lengths)
        self.options = {"batch_size": batch_size, "mode": mode, "max_tokens": max_tokens, "seed": seed,
                        "processes": processes, "rows_per_example": rows_per_example}
        self._epochs: list[list[list[list[int]]]] = []
        self._starts: list[int] = [0]  # micro-batch number at which each epoch starts

    def epoch(self, epoch: int) -> list[list[list[int]]]:
        """The global micro-batches of ``epoch`` (0-based)."""
        while len(self._epochs) <= epoch:
            batches = epoch_batches(self.lengths, epoch=len(self._epochs), **self.options)
            if not batches:
                raise ValueError("an epoch with no batches")
            self._epochs.append(batches)
            self._starts.append(self._starts[-1] + len(batches))
        return self._epochs[epoch]

    def micro_batches(self, epochs: int) -> int:
        """Number of global micro-batches in the first ``epochs`` epochs."""
        self.epoch(epochs - 1)
        return self._starts[epochs]

    def locate(self, k: int) -> tuple[int, list[list[int]]]:
        """(epoch, global micro-batch) of micro-batch number ``k`` (0-based, counted over epochs)."""
        epoch = 0
        while True:
            batches = self.epoch(epoch)
            if k < self._starts[epoch + 1]:
                return epoch, batches[k - self._starts[epoch]]
            epoch += 1

    def epoch_of(self, k: int) -> float:
        """Epochs completed after micro-batch count ``k``: whole epochs plus the fraction of the current one."""
        epoch, _ = self.locate(max(k - 1, 0))
        start, stop = self._starts[epoch], self._starts[epoch + 1]
        return epoch + (k - start) / (stop - start)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded tokens of ``batches`` that are padding (0: none)."""
    padded = sum(len(b) * max(lengths[j] for j in b) for b in batches if b)
    useful = sum(lengths[j] for b in batches for j in b)
    return 1.0 - useful / padded if padded else 0.0
