"""The REFERENCE SparseGPT procedure (../shared/ALGORITHM.md), plainly, as a yardstick.

This is what our engine is measured against in the same benchmark run: the reference's
procedure and nothing cleverer. One calibration sample per forward pass, one Hessian per
Linear (the reference's add_batch rule, n counting sequences), two passes per block (a
calibration pass with hooks, the solves, a second pass through the pruned block to make the
next block's inputs). Also magnitude (per layer) and Wanda baselines the same plain way, and
the reference's perplexity (non-overlapping windows, exp of the mean window cross-entropy).

Written for decoder-only causal LMs whose blocks are `model.model.layers` (LLaMA family,
transformers 5): block 0's inputs are captured with every keyword a block is called with
(position_embeddings, attention_mask, position_ids, ...), cache off.

    python benchmarks/reference_sparsegpt.py --method sparsegpt --sparsity 0.5 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "protocol-p"
DEFAULT_MODEL = REPO / "models" / "smollm2-135m"


# ----------------------------------------------------------------------------- memory / patterns


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_pattern(value: str) -> tuple[float, int, int]:
    """'0.5' -> (0.5, 0, 0); '2:4' -> (0.5, 2, 4): (sparsity, prunen, prunem)."""
    if ":" in value:
        n, m = (int(x) for x in value.split(":"))
        return n / m, n, m
    return float(value), 0, 0


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n smallest scores of every group of m consecutive columns (rows x cols)."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False)[1], True)
    return mask.reshape(rows, cols)


# ----------------------------------------------------------------------------- data


def load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def tokenize_file(tokenizer, path: str | Path) -> torch.Tensor:
    """Read the file whole as UTF-8 and tokenize it once; (1, ntok)."""
    text = Path(path).read_text(encoding="utf-8")
    return tokenizer(text, return_tensors="pt").input_ids


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """The reference's sampling: random.seed(seed); nsamples windows at randint(0, ntok-seqlen-1)."""
    random.seed(seed)
    ntok = ids.shape[1]
    samples = []
    for _ in range(nsamples):
        i = random.randint(0, ntok - seqlen - 1)
        samples.append(ids[:, i : i + seqlen])
    return samples


def eval_windows(ids: torch.Tensor, seqlen: int, limit: int | None) -> list[torch.Tensor]:
    """Non-overlapping windows of seqlen from the start, the tail dropped, the first `limit`."""
    count = ids.shape[1] // seqlen
    if limit is not None:
        count = min(count, limit)
    return [ids[:, k * seqlen : (k + 1) * seqlen] for k in range(count)]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp of the mean over windows of each window's mean next-token cross-entropy."""
    losses = []
    for ids in windows:
        logits = model(ids, use_cache=False).logits.float()  # (1, seq, vocab)
        shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        shift_labels = ids[:, 1:].reshape(-1)
        losses.append(nn.functional.cross_entropy(shift_logits, shift_labels).item())
    return math.exp(sum(losses) / len(losses))


# ----------------------------------------------------------------------------- block inputs


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block0_inputs(model, samples: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Hidden states entering block 0 for every sample (n, seq, hidden) and the block's kwargs."""
    layers = model.model.layers
    inps: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inps.append(hidden[0].clone())
        kwargs_seen.clear()
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model(ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    # every sample has the same length, so the mask / positions captured last serve all of them
    kwargs_seen["use_cache"] = False
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    return torch.stack(inps), kwargs_seen


def run_block(block, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden.unsqueeze(0), **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[0]


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------- the solver


class SparseGPTLayer:
    """One Linear: accumulate H = (2/n) sum x x^T over calibration sequences, then solve."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        cols = layer.weight.shape[1]
        self.H = torch.zeros(cols, cols, dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]  # sequences in this forward (1 here)
        x = inp.reshape(-1, inp.shape[-1]).t()  # (cols, batch*seq)
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x @ x.t()

    @torch.no_grad()
    def prune(
        self, sparsity: float, prunen: int = 0, prunem: int = 0, blocksize: int = 128, percdamp: float = 0.01
    ) -> float:
        W = self.layer.weight.data.clone().float()  # (rows, cols)
        rows, cols = W.shape
        H = self.H
        self.H = None

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        damp = percdamp * torch.mean(torch.diag(H))
        idx = torch.arange(cols)
        H[idx, idx] += damp
        # upper Cholesky factor of H^-1
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        total_loss = torch.zeros(rows)
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            diag1 = torch.diag(Hinv1)

            if prunen == 0:
                # adaptive mask over the whole block: the k-th smallest score, with <= (ties: more)
                score = W1**2 / diag1.reshape(1, -1) ** 2
                thresh = torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
                M1 = score <= thresh
            else:
                M1 = torch.zeros_like(W1, dtype=torch.bool)

            for i in range(count):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    score = W1[:, i : i + prunem] ** 2 / diag1[i : i + prunem].reshape(1, -1) ** 2
                    smallest = torch.topk(score, prunen, dim=1, largest=False)[1]
                    M1.scatter_(1, i + smallest, True)
                q = w.clone()
                q[M1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err

            W[:, i1:i2] = Q1
            total_loss += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        self.layer.weight.data = W.to(self.layer.weight.dtype)
        return total_loss.sum().item()


class WandaLayer:
    """One Linear: accumulate ||X_j||^2 / n per input feature (Wanda's scaler_row), then prune."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.scaler_row = torch.zeros(layer.weight.shape[1], dtype=torch.float32)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()  # (cols, tokens)
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples

    @torch.no_grad()
    def prune(self, sparsity: float, prunen: int = 0, prunem: int = 0, **_) -> float:
        W = self.layer.weight.data
        metric = W.abs().float() * torch.sqrt(self.scaler_row.reshape(1, -1))
        mask = torch.zeros_like(metric, dtype=torch.bool)  # True = prune
        if prunen:
            mask = nm_mask(metric, prunen, prunem)
        else:
            order = torch.sort(metric, dim=-1, stable=True)[1]
            mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
        W[mask] = 0
        return 0.0


# ----------------------------------------------------------------------------- drivers


@torch.no_grad()
def prune_sequential(
    model,
    samples: list[torch.Tensor],
    method: str,
    pattern: str,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    log=print,
) -> dict:
    """The reference driver: per block, hooks + calibration pass, solve, second pass."""
    sparsity, prunen, prunem = parse_pattern(pattern)
    solver_cls = {"sparsegpt": SparseGPTLayer, "wanda": WandaLayer}[method]
    t0 = time.perf_counter()
    inps, kwargs = capture_block0_inputs(model, samples)
    outs = torch.zeros_like(inps)
    t_solve = 0.0
    losses = {}
    layers = model.model.layers
    for b, block in enumerate(layers):
        solvers = {name: solver_cls(lin) for name, lin in block_linears(block).items()}

        def hook_for(solver):
            def hook(module, inp, out):
                solver.add_batch(inp[0].data)

            return hook

        handles = [s.layer.register_forward_hook(hook_for(s)) for s in solvers.values()]
        for j in range(inps.shape[0]):  # calibration pass, one sample at a time
            outs[j] = run_block(block, inps[j], kwargs)
        for h in handles:
            h.remove()

        ts = time.perf_counter()
        for name, solver in solvers.items():
            losses[f"model.layers.{b}.{name}"] = solver.prune(
                sparsity, prunen, prunem, blocksize=blocksize, percdamp=percdamp
            )
        t_solve += time.perf_counter() - ts
        del solvers

        for j in range(inps.shape[0]):  # the pruned block's outputs feed the next block
            outs[j] = run_block(block, inps[j], kwargs)
        inps, outs = outs, inps
        if log:
            log(f"block {b + 1}/{len(layers)} done, {time.perf_counter() - t0:.1f}s")
    return {"seconds_solve": t_solve, "losses": losses}


@torch.no_grad()
def prune_magnitude(model, pattern: str) -> dict:
    """Per-layer magnitude: the smallest |W| of each Linear (or the N smallest of each M)."""
    sparsity, prunen, prunem = parse_pattern(pattern)
    for block in model.model.layers:
        for lin in block_linears(block).values():
            W = lin.weight.data
            if prunen:
                W[nm_mask(W.abs(), prunen, prunem)] = 0
            else:
                thresh = torch.sort(W.abs().flatten())[0][int(W.numel() * sparsity)]
                W[W.abs() <= thresh] = 0
    return {}


def achieved_sparsity(model) -> float:
    zeros = total = 0
    for block in model.model.layers:
        for lin in block_linears(block).values():
            zeros += (lin.weight == 0).sum().item()
            total += lin.weight.numel()
    return zeros / total


# ----------------------------------------------------------------------------- one run


def run(
    method: str,
    pattern: str | None,
    *,
    model_path=DEFAULT_MODEL,
    calibration=DATA / "calibration.txt",
    eval_file=DATA / "eval.txt",
    nsamples: int = 32,
    seqlen: int = 512,
    seed: int = 0,
    eval_limit: int | None = 40,
    blocksize: int = 128,
    percdamp: float = 0.01,
    threads: int = 2,
    do_eval: bool = True,
    verbose: bool = False,
) -> dict:
    """Load, prune (method 'dense' skips it), evaluate; the figures of one protocol-P run."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    model = load_model(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    t_load = time.perf_counter() - t_start
    result: dict = {"method": method, "pattern": pattern or "-", "runner": "reference"}

    if method in ("sparsegpt", "wanda"):
        samples = calibration_samples(tokenize_file(tokenizer, calibration), nsamples, seqlen, seed)
    t0 = time.perf_counter()  # the prune phase: forward passes, Hessians, solves (not tokenizing)
    if method in ("sparsegpt", "wanda"):
        info = prune_sequential(
            model, samples, method, pattern, blocksize=blocksize, percdamp=percdamp, log=print if verbose else None
        )
        result["seconds_solve"] = info["seconds_solve"]
    elif method == "magnitude":
        prune_magnitude(model, pattern)
    elif method != "dense":
        raise SystemExit(f"unknown method {method!r}")
    result["prune_seconds"] = time.perf_counter() - t0 if method != "dense" else None
    result["load_seconds"] = t_load
    result["peak_rss_after_prune"] = peak_rss_bytes()
    result["sparsity"] = achieved_sparsity(model)

    if do_eval:
        t0 = time.perf_counter()
        windows = eval_windows(tokenize_file(tokenizer, eval_file), seqlen, eval_limit)
        result["perplexity"] = perplexity(model, windows)
        result["eval_seconds"] = time.perf_counter() - t0
    result["peak_rss"] = peak_rss_bytes()
    return result


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """Protocol P's data and solver settings, with its defaults (every runner takes these)."""
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--calibration", default=str(DATA / "calibration.txt"))
    p.add_argument("--eval", dest="eval_file", default=str(DATA / "eval.txt"))
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the figures here")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Reference SparseGPT / Wanda / magnitude on protocol P")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude", "dense"])
    p.add_argument("--sparsity", default="0.5", help="0.5, 2:4, 4:8, ...")
    add_protocol_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    result = run(
        a.method,
        None if a.method == "dense" else a.sparsity,
        model_path=a.model,
        calibration=a.calibration,
        eval_file=a.eval_file,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        seed=a.seed,
        eval_limit=a.eval_windows,
        blocksize=a.blocksize,
        percdamp=a.percdamp,
        threads=a.threads,
        do_eval=not a.no_eval,
        verbose=a.verbose,
    )
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
