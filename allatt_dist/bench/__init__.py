"""`allatt-dist bench`: training throughput, inference latency and FLOPs of a config's model.

Single process, single device, plain torch (no Ray, no DeepSpeed). What is measured, after warm-up,
as the median over `--repeats` (CUDA-synchronised on a GPU):

- one training step of the dense model on real text (forward with the Transformer-XL memory,
  backward, torch Adam step): tokens/s and peak memory;
- one eval forward of a segment (targets scored, memory carried in) for the dense model and for
  physically pruned models at each of `--sparsities`: latency, peak memory, parameters (the pruned
  models: see `inference.py`);
- model FLOPs per token from the formula in `perf.flops_per_token` (docs/performance.md), the achieved
  training TFLOP/s, and MFU where the device's peak is known.

Peak memory: on CUDA `torch.cuda.max_memory_allocated()` over the step (absolute). On CPU the
growth of the resident set during the step: freed heap is returned first (`malloc_trim`), the
high-water mark is reset through /proc/self/clear_refs, and the step's VmHWM minus the RSS before it
is reported (so parameters and optimizer state, allocated before, are not in it; they are given as
`train_state_bytes`). Null where the platform offers neither.

The tokens are real text from the config's corpus (train split for training, valid for inference),
or with `--vocab-size V` seeded uniform ids over V words (for a machine without the data).

`--baseline` also times the first, straightforward implementation (`use_fast_paths(model, False)`:
one dense-bias SDPA call per layer, unfused output cross-entropy, torch's default Adam, eager), its
steps interleaved with the fast ones, so the ratio holds under the same machine load. It runs in
the `--dtype` precision unless `--baseline-dtype` says otherwise (e.g. `--dtype bf16 --baseline-dtype
fp32`: the fast recipe against the plain fp32 version a first implementation would be).

The package, one job per module: `options.py` (the flags, parsed once into `BenchOptions`),
`context.py` (device, tokens, precision, fast-path switches, interleaved timing), `train.py`
(measure-train), `inference.py` (measure-inference), `report.py` (JSON header, derived rates,
table), `command.py` (the command: options -> measurements -> report). The FLOPs formula, peak
table, peak-memory probe and clocks are in `allatt_dist/perf.py`.
"""

from allatt_dist.bench.command import cmd_bench, register, run_bench
from allatt_dist.bench.options import BenchOptions

__all__ = ["BenchOptions", "cmd_bench", "register", "run_bench"]
