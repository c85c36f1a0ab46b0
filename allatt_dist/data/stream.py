"""Segment streams for Transformer-XL style language modelling.

Training (`LMStream`): the token stream is cut into `global_batch` contiguous rows; each rank owns
a block of rows and reads them left to right in segments of `seq_len`, so a row's segments follow
each other and the model's memory carries over between steps. The layout depends only on the
global batch, so the position (`state_dict`) is valid for any world size. With `row_shift_seed`
(train.row_shift, the authors' loader) every row is rotated by its own random offset at the start of
each epoch, the first included (the offsets are drawn from the seed and the epoch for all global rows,
so they too are the same for any world size, and a resumed stream draws them again).

Evaluation (`eval_segments`): every next-token target of a split is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from allatt_dist.errors import DataError

IGNORE_INDEX = -100


class LMStream:
    def __init__(
        self,
        tokens: np.ndarray,
        global_batch: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        row_shift_seed: int | None = None,
    ) -> None:
        _check_layout(global_batch, seq_len, rank, world_size)
        n = int(tokens.shape[0])
        row_len = n // global_batch
        if row_len < seq_len + 1:
            raise DataError(
                f"split too small for batch {global_batch} x seq_len {seq_len}: {n} tokens give rows of "
                f"{row_len}, need at least {seq_len + 1}"
            )
        rows = tokens[: global_batch * row_len].reshape(global_batch, row_len)  # (B, L), a view (no copy)
        local = global_batch // world_size
        mine = np.array(rows[rank * local : (rank + 1) * local], dtype=np.int64)  # (b, L), this rank's rows
        self._rows = torch.from_numpy(mine)  # (b, L), own writable copy
        self._first_row, self._global_batch = rank * local, global_batch
        self.row_shift_seed = row_shift_seed
        self._shifted: tuple[int, torch.Tensor] | None = None  # (epoch, rows rotated for it)
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.pos = 0  # index of the next segment within the epoch

    @property
    def segments_per_epoch(self) -> int:
        """Full segments per row; the last input of a segment predicts the next one's first token."""
        return (int(self._rows.shape[1]) - 1) // self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs (b, T), targets (b, T), reset_memory); wraps to a new epoch when exhausted."""
        if self.pos >= self.segments_per_epoch:
            self.epoch += 1
            self.pos = 0
        reset = self.pos == 0
        start = self.pos * self.seq_len
        window = self._epoch_rows()[:, start : start + self.seq_len + 1]  # (b, T+1)
        inputs = window[:, :-1].contiguous()  # (b, T)
        targets = window[:, 1:].contiguous()  # (b, T)
        self.pos += 1
        return inputs, targets, reset

    def row_offsets(self, epoch: int) -> np.ndarray:
        """This rank's rows' rotations in `epoch` (b,), each in [1, L-1) as the authors' loader draws them."""
        rng = np.random.default_rng([self.row_shift_seed or 0, epoch])
        every = rng.integers(1, int(self._rows.shape[1]) - 1, size=self._global_batch)  # (B,) all global rows
        return every[self._first_row : self._first_row + int(self._rows.shape[0])]

    def _epoch_rows(self) -> torch.Tensor:
        """(b, L): the rows as read this epoch (rotated right by their offsets under row_shift_seed)."""
        if self.row_shift_seed is None:
            return self._rows
        if self._shifted is None or self._shifted[0] != self.epoch:
            n = int(self._rows.shape[1])
            shift = torch.from_numpy(self.row_offsets(self.epoch))[:, None]  # (b, 1)
            idx = (torch.arange(n)[None, :] - shift) % n  # (b, L): position j reads j - shift, as np.roll
            self._shifted = (self.epoch, torch.gather(self._rows, 1, idx))
        return self._shifted[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, pos = int(state["epoch"]), int(state["pos"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"bad data stream state {state!r}: expected {{'epoch': int, 'pos': int}}") from None
        if epoch < 0 or not 0 <= pos <= self.segments_per_epoch:
            raise DataError(
                f"data stream state {state!r} does not fit this stream ({self.segments_per_epoch} segments per epoch)"
            )
        self.epoch, self.pos = epoch, pos


def eval_segments(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_segments: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs (B, T), targets (B, T)) covering each of the n-1 targets exactly once.

    Row b holds inputs b*L .. (b+1)*L-1 and targets b*L+1 .. (b+1)*L with L = ceil((n-1)/B); the
    tail is padded (inputs 0, targets -100). The last segment may be shorter than `seq_len`.
    """
    _check_layout(batch_size, seq_len, 0, 1)
    inputs, targets = _eval_rows(tokens, batch_size)  # (B, L), (B, L)
    row_len = int(inputs.shape[1])
    count = 0
    for start in range(0, row_len, seq_len):
        if max_segments is not None and count >= max_segments:
            return
        stop = start + seq_len
        yield inputs[:, start:stop].contiguous(), targets[:, start:stop].contiguous()  # (B, <=T) each
        count += 1


def num_eval_segments(n_tokens: int, batch_size: int, seq_len: int, max_segments: int | None = None) -> int:
    """How many segments `eval_segments` yields for a split of `n_tokens` tokens."""
    row_len = -(-(n_tokens - 1) // batch_size)
    total = -(-row_len // seq_len)
    return total if max_segments is None else min(total, max_segments)


def _eval_rows(tokens: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(tokens.shape[0])
    if n < 2:
        raise DataError(f"split has {n} token(s); evaluation needs at least 2")
    n_targets = n - 1
    row_len = -(-n_targets // batch_size)  # ceil
    flat = np.asarray(tokens, dtype=np.int64)  # (n,)
    inputs = np.zeros(batch_size * row_len, dtype=np.int64)  # (B*L,)
    targets = np.full(batch_size * row_len, IGNORE_INDEX, dtype=np.int64)  # (B*L,)
    inputs[:n_targets] = flat[:-1]
    targets[:n_targets] = flat[1:]
    shape = (batch_size, row_len)
    return torch.from_numpy(inputs.reshape(shape)), torch.from_numpy(targets.reshape(shape))  # (B, L) each


def _check_layout(batch: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch <= 0 or seq_len <= 0:
        raise ValueError(f"batch ({batch}) and seq_len ({seq_len}) must be positive")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch % world_size:
        raise ValueError(f"global batch {batch} is not divisible by world_size {world_size}")
