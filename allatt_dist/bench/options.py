"""What one `allatt-dist bench` run measures and how: `BenchOptions`, built once from the flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

from allatt_dist.cliargs import positive_int
from allatt_dist.errors import UserError

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class BenchOptions:
    """The command line of `allatt-dist bench`, checked; the recipe supplies the model and data.

    `batch_size`/`eval_batch_size` None: the recipe's train.batch_size / data.eval_batch_size.
    `baseline_dtype` None: the same as `dtype`. `vocab_size` set: seeded random ids, no corpus.
    `cpu_clock`: time with this process's CPU time (CPU device only) instead of the wall clock.
    """

    device: Literal["cpu", "cuda"] | None = None
    dtype: Precision = "fp32"
    repeats: int = 10
    warmup: int = 3
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    batch_size: int | None = None
    eval_batch_size: int | None = None
    impl: Literal["split", "split_kernel", "dense_bias"] = "split"
    unfused_loss: bool = False
    plain_adam: bool = False
    compile: bool = False
    baseline: bool = False
    baseline_dtype: Precision | None = None
    threads: int | None = None
    seed: int = 0
    train: bool = True
    vocab_size: int | None = None
    cpu_clock: bool = False

    def __post_init__(self) -> None:
        if any(not 0.0 <= s < 1.0 for s in self.sparsities) or self.repeats < 1 or self.warmup < 0:
            raise UserError("--sparsities must lie in [0, 1), --repeats >= 1, --warmup >= 0")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise UserError(f"--vocab-size {self.vocab_size}: need at least 2")

    @property
    def precision_of_baseline(self) -> Precision:
        return self.baseline_dtype or self.dtype

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> BenchOptions:
        try:
            sparsities = tuple(float(s) for s in a.sparsities.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--sparsities {a.sparsities!r}: expected a comma list of numbers in [0, 1)") from None
        return cls(
            device=a.device,
            dtype=a.dtype,
            repeats=a.repeats,
            warmup=a.warmup,
            sparsities=sparsities,
            batch_size=a.batch_size,
            eval_batch_size=a.eval_batch_size,
            impl=a.impl,
            unfused_loss=a.unfused_loss,
            plain_adam=a.plain_adam,
            compile=a.compile,
            baseline=a.baseline,
            baseline_dtype=a.baseline_dtype,
            threads=a.threads,
            seed=a.seed,
            train=not a.no_train,
            vocab_size=a.vocab_size,
            cpu_clock=a.clock == "cpu",
        )


def register_flags(p: argparse.ArgumentParser) -> None:
    """The flags `BenchOptions.from_args` reads."""
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast to bfloat16")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (plus those filling the memory)")
    p.add_argument("--sparsities", default="0.25,0.5,0.75", help="comma list of pruned fractions ('' for none)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="training batch (default train.batch_size)")
    p.add_argument(
        "--eval-batch-size", type=positive_int, default=None, help="inference batch (default data.eval_batch_size)"
    )
    p.add_argument("--impl", choices=["split", "split_kernel", "dense_bias"], default="split", help="attention path")
    p.add_argument("--unfused-loss", action="store_true", help="ablation: plain linear + cross_entropy output")
    p.add_argument("--plain-adam", action="store_true", help="ablation: torch's default Adam, not the fused one")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--baseline", action="store_true", help="also time the straightforward eager version")
    p.add_argument(
        "--baseline-dtype", choices=["fp32", "bf16"], default=None, help="the baseline's precision (default: --dtype)"
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (CPU device)")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement")
    p.add_argument("--vocab-size", type=int, default=None, help="random token ids of this vocabulary, no corpus")
