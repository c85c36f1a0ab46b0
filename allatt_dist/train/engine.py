"""What a worker asks of the DeepSpeed engine and the process group: means and perplexity over all ranks,
the fp32 master weights (gathered under ZeRO-3), the gates' state and final cut, memory statistics, and
this rank's Transformer-XL memory as a checkpoint file. Collective functions say so: every rank calls them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from allatt_dist.config import RunConfig
from allatt_dist.evaluate import evaluate
from allatt_dist.model.gates import GATE_PARAM
from allatt_dist.model.targets import final_mask
from allatt_dist.model.transformer import LanguageModel
from allatt_dist.train.setup import TrainModule


def all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def valid_ppl(lm: LanguageModel, tokens: np.ndarray, cfg: RunConfig, rank: int, world: int, limit: int | None):
    """Validation perplexity with the rows of the eval layout split across ranks (all ranks run it)."""
    res = evaluate(lm, tokens, max(cfg.data.eval_batch_size, world), max_segments=limit, rows=(rank, world))
    total = torch.tensor([res.nll * res.tokens, float(res.tokens)], dtype=torch.float64)
    if dist.is_initialized() and world > 1:
        dist.all_reduce(total)
    nll = float(total[0] / total[1].clamp(min=1))
    return float(np.exp(min(nll, 50.0))), int(total[1])


def master_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s parameters as the optimizer holds them, fp32 on CPU: DeepSpeed's fp32 master copies
    under bf16/fp16 (the module itself is then low precision), gathered under ZeRO-3. Collective:
    every rank must call it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None when the engine keeps no separate master (fp32, ZeRO-0)
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def gate_probs(lm: LanguageModel) -> tuple[np.ndarray, np.ndarray] | None:
    """(P(z = 1), eval-open mask), each (layers, heads), from the fp32 gate logits (those the exported
    model gets): the mask is what pruning will keep, decided on the logits, not on rounded probabilities."""
    if not lm.gates:
        return None
    probs, opened = [], []
    for gate in lm.gates:
        logits = master_weights(gate)[GATE_PARAM]  # (H,) gathered under ZeRO-3
        probs.append(gate.probabilities(logits).numpy())
        opened.append(gate.open_mask(logits).numpy())
    return np.stack(probs), np.stack(opened)


def final_cut(lm: LanguageModel, remove: int | None) -> None:
    """Keep exactly the most open heads the target allows (`gates.final_cut`), on every rank alike: the
    decision is made on the gathered fp32 logits (collective under ZeRO-3) and overrides the eval gate."""
    if remove is None or not lm.gates:
        return
    logits = torch.stack([master_weights(g)[GATE_PARAM] for g in lm.gates])  # (L, H)
    for gate, keep in zip(lm.gates, final_mask(logits, remove), strict=True):
        gate.cut = keep  # (H,) bool


def register_io_params(module: TrainModule) -> None:
    """ZeRO-3: keep the tied embedding/softmax matrices gathered wherever they are read.

    ZeRO-3 gathers a parameter only around the forward and backward of the module that owns it, and
    `lm.io` is never called itself (the model reads it through `io.embed()` / `io.nll()`). DeepSpeed
    would attach these matrices to `LanguageModel` on first use, but it cannot hook the backward of a
    module that returns a dataclass (`LMOutput`), so the backward pass found them partitioned (size 0).
    Registering them with `TrainModule` (tuple output: training forward and backward) and with the
    language model (evaluation calls it directly) keeps them available.
    """
    import deepspeed

    table = [module.lm.pos_table] if module.lm.pos_table is not None else []  # learned positions: read alike
    for p in [*module.lm.io.parameters(), *table]:
        deepspeed.zero.register_external_parameter(module, p)
        deepspeed.zero.register_external_parameter(module.lm, p)


def optimizer_state_bytes(engine) -> int:
    """Bytes of the optimizer state (Adam moments, step) this rank holds: under ZeRO 1-3 only its partition."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)  # DeepSpeed's ZeRO optimizers wrap a torch optimizer
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


def memory_stats(engine, world: int) -> dict[str, list[int]]:
    """Per rank (index = rank): optimizer-state bytes and peak resident memory of the worker process."""
    import resource

    mine = (optimizer_state_bytes(engine), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    every = [mine] * world
    if dist.is_initialized() and world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    return {
        "optimizer_state_bytes": [int(o) for o, _ in every],
        "peak_rss_bytes": [int(r) for _, r in every],
    }


def save_mems(path: Path, chunks: list[list[torch.Tensor] | None]) -> None:
    state = {f"c{c}_l{i}": m.contiguous().cpu() for c, ms in enumerate(chunks) if ms for i, m in enumerate(ms)}
    if state:
        save_file(state, str(path))


def load_mems(path: Path, n_chunks: int, device) -> list[list[torch.Tensor] | None]:
    if not path.is_file():
        return [None] * n_chunks
    state = load_file(str(path), device=str(device))
    out = []
    for c in range(n_chunks):
        layers = sorted((int(k.split("_l")[1]), v) for k, v in state.items() if k.startswith(f"c{c}_"))
        out.append([v for _, v in layers] or None)
    return out
