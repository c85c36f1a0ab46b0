"""`allatt-dist bench`: training throughput, inference latency and FLOPs of a config's model.

Single process, single device, plain torch (no Ray, no DeepSpeed). What is measured, after warm-up,
as the median over `--repeats` (CUDA-synchronised on a GPU):

- one training step of the dense model on real text (forward with the Transformer-XL memory,
  backward, torch Adam step): tokens/s and peak memory;
- one eval forward of a segment (targets scored, memory carried in) for the dense model and for
  physically pruned models at each of `--sparsities`: latency, peak memory, parameters. The pruned
  models come from a gated copy whose log_alpha is set to a seeded random open/closed pattern (the
  same heads each run; a higher sparsity closes a superset of the heads of a lower one);
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
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from allatt_dist.cliargs import add_override_arg, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="model speed: train tokens/s, (pruned) inference latency, FLOPs, MFU")
    p.add_argument("config", help="recipe YAML; its model, data, train.batch_size and gates sections are used")
    add_override_arg(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON (default: a short table)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
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
    p.set_defaults(fn=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> dict | None:
    import json

    from allatt_dist.errors import UserError
    from allatt_dist.outputs import check_output_file
    from allatt_dist.recipe import load_config

    cfg = load_config(a.config, a.overrides)
    if a.out:
        check_output_file(Path(a.out))
    try:
        sparsities = [float(s) for s in a.sparsities.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sparsities {a.sparsities!r}: expected a comma list of numbers in [0, 1)") from None
    if any(not 0.0 <= s < 1.0 for s in sparsities) or a.repeats < 1 or a.warmup < 0:
        raise UserError("--sparsities must lie in [0, 1), --repeats >= 1, --warmup >= 0")
    if a.vocab_size is not None and a.vocab_size < 2:
        raise UserError(f"--vocab-size {a.vocab_size}: need at least 2")
    res = run_bench(
        cfg,
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
        compile_model=a.compile,
        baseline=a.baseline,
        baseline_dtype=a.baseline_dtype,
        threads=a.threads,
        seed=a.seed,
        train=not a.no_train,
        vocab_size=a.vocab_size,
        cpu_clock=a.clock == "cpu",
    )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if a.json:
        return res
    print(format_table(res))
    return None


def run_bench(
    cfg,
    *,
    device: str | None = None,
    dtype: str = "fp32",
    repeats: int = 10,
    warmup: int = 3,
    sparsities: list[float] | None = None,
    batch_size: int | None = None,
    eval_batch_size: int | None = None,
    impl: str = "split",
    unfused_loss: bool = False,
    plain_adam: bool = False,
    compile_model: bool = False,
    baseline: bool = False,
    baseline_dtype: str | None = None,
    threads: int | None = None,
    seed: int = 0,
    train: bool = True,
    vocab_size: int | None = None,
    cpu_clock: bool = False,
) -> dict[str, Any]:
    import contextlib

    import torch

    from allatt_dist.data.corpus import load_corpus
    from allatt_dist.data.stream import LMStream, eval_segments
    from allatt_dist.errors import UserError
    from allatt_dist.model.attention import set_attention_impl
    from allatt_dist.model.output import TiedSoftmax
    from allatt_dist.model.transformer import LanguageModel, count_params, use_fast_paths
    from allatt_dist.perf import (
        PeakMemory,
        adam,
        clock,
        compiled,
        cpu_name,
        flops_per_token,
        head_patterns,
        peak_tflops,
        pruned_model,
        summary,
        warm,
    )

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch sees no CUDA device")
    if cpu_clock and dev.type != "cpu":
        raise UserError("--clock cpu measures CPU time: use it with --device cpu")
    if impl == "split_kernel" and dev.type != "cpu":
        raise UserError("--impl split_kernel runs on CPU only")
    mc = cfg.model
    b_train, b_eval = batch_size or cfg.train.batch_size, eval_batch_size or cfg.data.eval_batch_size
    if vocab_size:  # no corpus: seeded uniform ids (e.g. on a machine without the data)
        import numpy as np

        rng = np.random.default_rng(seed)
        n = max(b_train, b_eval) * mc.seq_len * 64 + 1
        splits = {s: rng.integers(0, vocab_size, n, dtype=np.int64) for s in ("train", "valid")}
        vocab = vocab_size
    else:
        corpus = load_corpus(cfg.data, splits=("train", "valid"))
        splits = {s: corpus.tokens(s) for s in ("train", "valid")}
        vocab = len(corpus.vocab)
    fill = math.ceil(mc.mem_len / mc.seq_len) if mc.mem_len else 0  # steps until the memory is full
    n_warm = warmup + fill
    baseline_dtype = baseline_dtype or dtype

    def amp(fast: bool = True):
        """The precision of the fast model, or of the baseline (--baseline-dtype)."""
        bf16 = (dtype if fast else baseline_dtype) == "bf16"
        return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    note: dict[str, Any] = {}
    sparsities = sorted({0.0, *(sparsities or [])})
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "dtype": dtype,
        "config": {
            "architecture": mc.architecture,
            "num_layers": mc.num_layers,
            "hidden_dim": mc.hidden_dim,
            "num_heads": mc.num_heads,
            "num_persistent": mc.num_persistent,
            "seq_len": mc.seq_len,
            "mem_len": mc.mem_len,
            "adaptive_cutoffs": list(mc.adaptive_cutoffs),
            "vocab_size": vocab,
            "tokens": "random" if vocab_size else "corpus",
            "train_batch": b_train,
            "eval_batch": b_eval,
            "impl": impl,
            "fused_loss": not unfused_loss,
            "adam": "default" if plain_adam else "fused",
            "compile": compile_model,
            "threads": torch.get_num_threads(),
            "clock": "cpu" if cpu_clock else "wall",
            "torch": torch.__version__,
            "repeats": repeats,
            "warmup": n_warm,
            "seed": seed,
        },
        "flops_per_token": flops_per_token(mc, vocab, batch=b_train),
    }
    res["train_flops_per_token"] = 3 * res["flops_per_token"]

    def fast_paths(model, fast: bool) -> None:
        use_fast_paths(model, fast)
        if fast:
            set_attention_impl(model, impl)
            for mod in model.modules():
                if isinstance(mod, TiedSoftmax):
                    mod.fused = not unfused_loss

    # ---- training -----------------------------------------------------------------------------
    def trainer(fast: bool):
        torch.manual_seed(seed)
        model = LanguageModel(mc, vocab).to(dev).train()
        fast_paths(model, fast)
        opt, kind = adam(model, cfg.train.lr, fast and not plain_adam)
        stream = LMStream(splits["train"], b_train, mc.seq_len)
        state: dict[str, Any] = {"mems": None}

        def make_step(loss_fn):
            def step():
                x, y, reset = stream.next_batch()
                x, y = x.to(dev), y.to(dev)  # (B,T) each
                opt.zero_grad(set_to_none=True)
                with amp(fast):
                    loss, mems = loss_fn(x, y, None if reset else state["mems"])
                loss.backward()
                opt.step()
                state["mems"] = mems

            return step

        eager = make_step(model.loss)
        if fast and compile_model:
            step = warm(n_warm, make_step(compiled(model.loss, note)), eager, note)
        else:
            step = warm(n_warm, eager, None, note)
        state_bytes = sum(p.nbytes for p in model.parameters()) + sum(
            t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
        )
        return step, kind, state_bytes

    if train:
        variants = {"fast": trainer(True)}
        if baseline:
            variants["baseline"] = trainer(False)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name, (step, _, _) in variants.items():
                t0 = clock(dev, cpu_clock)
                step()
                times[name].append(clock(dev, cpu_clock) - t0)
        tokens = b_train * mc.seq_len
        for name, (step, kind, state_bytes) in variants.items():
            with PeakMemory(dev) as pm:
                step()
            stats = summary(times[name])
            out = res if name == "fast" else res.setdefault("baseline", {})
            out["train_tokens_per_s"] = tokens / (stats["median"] / 1e3)
            out["train_step_ms"] = stats
            out["train_peak_mem_bytes"] = pm.peak
            out["train_state_bytes"] = state_bytes
            out["optimizer"] = kind
            out["dtype"] = dtype if name == "fast" else baseline_dtype
        del variants
        res["train_tflops"] = res["train_flops_per_token"] * res["train_tokens_per_s"] / 1e12
        peak = peak_tflops(res["device"], dtype) if dev.type == "cuda" else None
        res["peak_tflops"] = peak
        res["mfu"] = res["train_tflops"] / peak if peak else None
        if baseline:
            res["train_speedup"] = res["train_tokens_per_s"] / res["baseline"]["train_tokens_per_s"]

    # ---- inference: dense and pruned --------------------------------------------------------------
    segs = list(eval_segments(splits["valid"], b_eval, mc.seq_len, max_segments=fill + 1))
    x_t, y_t = (s.to(dev) for s in segs[-1])  # the timed segment, (B,T) each

    def infer(model, fast: bool):
        model.to(dev).eval()
        fast_paths(model, fast)
        mems = None
        with torch.no_grad(), amp(fast):
            for x, y in segs[:-1]:
                mems = model(x.to(dev), mems, y.to(dev)).mems

        def make_fwd(fn):
            def fwd():
                with torch.no_grad(), amp(fast):
                    fn(x_t, mems, y_t)

            return fwd

        if fast and compile_model:
            return warm(warmup + 1, make_fwd(compiled(model, note)), make_fwd(model), note)
        return warm(warmup + 1, make_fwd(model), None, note)

    torch.manual_seed(seed)
    models = {0.0: LanguageModel(mc, vocab)}
    masks = head_patterns(mc.num_layers, mc.num_heads, [s for s in sparsities if s > 0], seed)
    for s, m in masks.items():
        models[s] = pruned_model(cfg, vocab, m, seed)
    fwds = {s: infer(m, True) for s, m in models.items()}
    if baseline:
        torch.manual_seed(seed)
        fwds["baseline"] = infer(LanguageModel(mc, vocab), False)
    itimes: dict[Any, list[float]] = {k: [] for k in fwds}
    for _ in range(repeats):
        for key, fwd in fwds.items():
            t0 = clock(dev, cpu_clock)
            fwd()
            itimes[key].append(clock(dev, cpu_clock) - t0)
    mem_peaks = {}
    for key, fwd in fwds.items():
        with PeakMemory(dev) as pm:
            fwd()
        mem_peaks[key] = pm.peak
    key = str
    f0 = flops_per_token(mc, vocab, models[0.0].heads_per_layer, b_eval)
    res["infer_ms"], res["infer_ms_stats"], res["infer_peak_mem_bytes"] = {}, {}, {}
    res["params"], res["heads_per_layer"], res["infer_flops_per_token"], res["infer_check"] = {}, {}, {}, {}
    ms0 = statistics.median(itimes[0.0]) * 1e3
    for s, m in models.items():
        st = summary(itimes[s])
        fl = flops_per_token(mc, vocab, m.heads_per_layer, b_eval)
        res["infer_ms"][key(s)] = st["median"]
        res["infer_ms_stats"][key(s)] = st
        res["infer_peak_mem_bytes"][key(s)] = mem_peaks[s]
        res["params"][key(s)] = count_params(m)
        res["heads_per_layer"][key(s)] = list(m.heads_per_layer)
        res["infer_flops_per_token"][key(s)] = fl
        ratio, bound = st["median"] / ms0, 1.1 * fl / f0
        res["infer_check"][key(s)] = {"latency_ratio": ratio, "flops_ratio": fl / f0, "within_1.1x": ratio <= bound}
    if baseline:
        st = summary(itimes["baseline"])
        res.setdefault("baseline", {})["infer_ms_dense"] = st["median"]
        res["baseline"]["infer_ms_dense_stats"] = st
        res["baseline"]["infer_peak_mem_bytes_dense"] = mem_peaks["baseline"]
    res["config"]["compiled"] = compile_model and "compile_error" not in note
    if "compile_error" in note:
        res["compile_error"] = note["compile_error"]
    return res


def format_table(res: dict[str, Any]) -> str:
    """A short human-readable summary of `run_bench`'s result."""

    def mib(x):
        return "n/a" if x is None else f"{x / 2**20:.1f} MiB"

    c = res["config"]
    lines = [
        f"device {res['device']} ({c['threads']} threads), dtype {res['dtype']}, impl {c['impl']}, "
        f"compiled {c['compiled']}, clock {c['clock']}",
        f"model {c['num_layers']}x{c['hidden_dim']}, {c['num_heads']} heads, N={c['num_persistent']}, "
        f"T={c['seq_len']}, M={c['mem_len']}, V={c['vocab_size']}; "
        f"forward {res['flops_per_token'] / 1e6:.2f} MFLOP/token",
    ]
    if "train_tokens_per_s" in res:
        mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        lines.append(
            f"train (batch {c['train_batch']}): {res['train_tokens_per_s']:.0f} tokens/s, step "
            f"{res['train_step_ms']['median']:.1f} ms, peak {mib(res['train_peak_mem_bytes'])}, "
            f"{res['train_tflops']:.3f} TFLOP/s, MFU {mfu}"
        )
        if "baseline" in res:
            b = res["baseline"]
            lines.append(
                f"  baseline ({b['dtype']}): {b['train_tokens_per_s']:.0f} tokens/s, "
                f"step {b['train_step_ms']['median']:.1f} ms, "
                f"peak {mib(b['train_peak_mem_bytes'])}; speed-up {res['train_speedup']:.2f}x"
            )
    lines.append(f"inference (batch {c['eval_batch']}), per segment:")
    lines.append("  sparsity  heads            params      ms   latency/dense  flops/dense")
    for s, ms in res["infer_ms"].items():
        chk = res["infer_check"][s]
        lines.append(
            f"  {float(s):8.2f}  {str(res['heads_per_layer'][s]):15s} {res['params'][s]:9d} {ms:7.2f}"
            f"   {chk['latency_ratio']:13.3f}  {chk['flops_ratio']:11.3f}"
        )
    if "baseline" in res and "infer_ms_dense" in res["baseline"]:
        lines.append(f"  baseline dense: {res['baseline']['infer_ms_dense']:.2f} ms")
    return "\n".join(lines)
