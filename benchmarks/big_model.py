"""Big models on one machine: peak host memory against the model's size, and (on CUDA) prune
seconds per billion parameters and peak GPU memory, with random weights of real shapes.

    python benchmarks/big_model.py --shape llama3-8b --blocks 12 --prune-blocks 1     # CPU, scaled down
    python benchmarks/big_model.py --shape llama3-8b --device cuda --dtype float16    # the whole 8B
    python benchmarks/big_model.py --shape llama3-70b --device cuda --dtype float16 --prune-blocks 4
    python benchmarks/big_model.py ... --llmcompressor .venv-bench/bin/python         # the peer, same GPU

Three processes: one writes the random model (safetensors shards, tensor by tensor: never the
whole model in memory), one prunes it with the engine as the worker runs it (run_job with a
checkpoint directory, so pruned blocks live in memory-mapped files), and, with --llmcompressor,
one runs llm-compressor's oneshot SparseGPT on the same files and calibration in its own
interpreter. Each pruning process samples /proc/self/status every 20 ms: peak VmRSS (every page
it has resident, file pages of the mapped weights included, which the kernel can drop) and peak
RssAnon (its own memory, which it cannot), both against the model's size on disk.
GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # the real models' shapes (config.json of meta-llama/Meta-Llama-3-8B and -70B)
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),  # a dry run
}
SHARD_BYTES = 2 * 10**9


class MemorySampler:
    """Peaks of this process's VmRSS, RssAnon and RssFile (bytes), sampled every ``interval`` s."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak = interval, dict.fromkeys(self.FIELDS, 0)
        self.label, self.peak_anon_at = "", ""  # what the run was doing (set by the caller) at the anonymous peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in self.FIELDS:
                    out[key] = int(line.split()[1]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.read().items():
                if k == "RssAnon" and v > self.peak[k]:
                    self.peak_anon_at = self.label
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak[k], v)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def write_model(directory: Path, shape: str, blocks: int | None, dtype: str, seed: int = 0) -> None:
    """config.json, a tokenizer and random safetensors shards of ``shape`` (``blocks`` deep)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from tests.support.tiny_models import make_tokenizer

    config = transformers.LlamaConfig(
        **{**SHAPES[shape], **({"num_hidden_layers": blocks} if blocks else {})},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.AutoModelForCausalLM.from_config(config).state_dict().items()}
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict = {}
    index: dict[str, str] = {}
    size = count = 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard:
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size, count = {}, 0, count + 1

    for name, s in shapes.items():
        if len(s) > 1:  # N(0, 0.02) as a trained model's init; row by row keeps the float32 temporary small
            t = torch.empty(s, dtype=torch_dtype)
            for r in range(0, s[0], 4096):
                t[r : r + 4096] = torch.randn((min(4096, s[0] - r), *s[1:]), generator=generator) * 0.02
        else:
            t = torch.ones(s, dtype=torch_dtype)
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * t.element_size()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.dtype = torch_dtype
    config.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)


def calibration_file(workdir: Path) -> Path:
    shared = Path(os.environ.get("SPARSEGPT_SHARED_DATA", REPO.parent / "shared" / "data")) / "calibration.txt"
    if shared.exists():
        return shared
    from tests.support.tiny_models import sample_text

    path = workdir / "calibration.txt"
    path.write_text(sample_text(400_000), encoding="utf-8")
    return path


def run_engine(a) -> dict:
    """The engine as the worker runs it, in this process, with its memory sampled."""
    import torch

    from worker.engine.contract.spec import JobSpec
    from worker.engine.pipeline import RunOptions, run_job

    torch.set_num_threads(a.threads) if a.threads else None
    last = None if a.prune_blocks is None else a.prune_blocks - 1
    spec = JobSpec.from_flat(
        model=str(a.model),
        sparsity=a.sparsity,
        dataset=str(a.calibration),
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        datasets=[],
        dtype=a.dtype,
        last_block=last,
    )
    with tempfile.TemporaryDirectory(prefix="big-model-resume-", dir=a.workdir) as resume, MemorySampler() as mem:
        before = mem.read()
        t0 = time.perf_counter()

        def on_progress(event: dict) -> None:
            mem.label = f"{event.get('stage')}: {event.get('message')}"

        report = run_job(spec, RunOptions(device=a.device, resume_dir=resume), on_progress=on_progress)
        wall = time.perf_counter() - t0
    pruned_params = block_params(a.model, a.prune_blocks)
    return {
        "runner": "engine",
        "device": a.device,
        "wall_seconds": wall,
        "prune_seconds": report["seconds"]["prune"],
        "load_seconds": report["seconds"]["load"],
        "pruned_block_params": pruned_params,
        "prune_seconds_per_billion": report["seconds"]["prune"] / (pruned_params / 1e9),
        "peak_gpu_bytes": report["peak_memory_bytes"] if a.device.startswith("cuda") else None,
        "rss_before": before,
        "peak": mem.peak,
        "peak_anonymous_during": mem.peak_anon_at,
        "sparsity": report.get("sparsity"),
        "environment": report["environment"],
    }


def block_params(model: Path, blocks: int | None) -> int:
    """Parameters of the first ``blocks`` decoder blocks (all: None) of the model in ``model``."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        layers = transformers.AutoModelForCausalLM.from_config(config).model.layers
    return sum(p.numel() for block in layers[:blocks] for p in block.parameters())


def run_llmcompressor(a) -> dict:
    """llm-compressor 0.14's oneshot SparseGPT on the same model files, calibration windows and GPU."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO / "benchmarks"))
    import reference_sparsegpt as ref

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    samples = ref.calibration_samples(ref.tokenize_file(tokenizer, Path(a.calibration)), a.nsamples, a.seqlen, 0)
    rows = [s[0].tolist() for s in samples]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    with MemorySampler() as mem:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
        torch.cuda.reset_peak_memory_stats()
        recipe = SparseGPTModifier(
            sparsity=float(a.sparsity),
            mask_structure="0:0",
            targets=["Linear"],
            ignore=["re:.*lm_head"],
            block_size=128,
            dampening_frac=0.01,
        )
        t0 = time.perf_counter()
        oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=a.nsamples,
            max_seq_length=a.seqlen,
            shuffle_calibration_samples=False,
            pipeline="sequential",
        )
        seconds = time.perf_counter() - t0
    return {
        "runner": "llm-compressor",
        "prune_seconds": seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "peak": mem.peak,
        "note": "whole model pruned (llm-compressor has no block range)",
    }


def child(a) -> None:
    result = run_llmcompressor(a) if a.child == "llmcompressor" else run_engine(a)
    Path(a.out).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument(
        "--blocks", type=int, default=None, help="decoder blocks of the written model (default: the shape's)"
    )
    p.add_argument("--prune-blocks", type=int, default=None, help="prune blocks 0..N-1 only (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=REPO / "build" / "big-model")
    p.add_argument("--keep", action="store_true", help="keep the written model for the next run")
    p.add_argument("--llmcompressor", metavar="PYTHON", help="also run llm-compressor with this interpreter (CUDA)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=["engine", "llmcompressor"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--calibration", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)

    a.workdir.mkdir(parents=True, exist_ok=True)
    model = a.workdir / f"{a.shape}-{a.blocks or 'all'}-{a.dtype}"
    if not (model / "config.json").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.big_model "
                "import write_model; from pathlib import Path; write_model(Path(sys.argv[2]), sys.argv[3], "
                "int(sys.argv[4]) or None, sys.argv[5])",
                str(REPO),
                str(model),
                a.shape,
                str(a.blocks or 0),
                a.dtype,
            ],
            check=True,
        )
        print(f"wrote {model} ({model_bytes(model) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    calibration = calibration_file(a.workdir)
    size = model_bytes(model)
    results = {
        "shape": a.shape,
        "blocks": a.blocks or SHAPES[a.shape]["num_hidden_layers"],
        "dtype": a.dtype,
        "prune_blocks": a.prune_blocks,
        "nsamples": a.nsamples,
        "seqlen": a.seqlen,
        "model_bytes": size,
        "host_ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "runs": [],
    }
    runners = [("engine", sys.executable)] + ([("llmcompressor", a.llmcompressor)] if a.llmcompressor else [])
    for runner, python in runners:
        out = a.workdir / f"{runner}.json"
        args = [
            python,
            __file__,
            "--child",
            runner,
            "--model",
            str(model),
            "--calibration",
            str(calibration),
            "--out",
            str(out),
            "--device",
            a.device,
            "--dtype",
            a.dtype,
            "--sparsity",
            a.sparsity,
            "--nsamples",
            str(a.nsamples),
            "--seqlen",
            str(a.seqlen),
            "--workdir",
            str(a.workdir),
        ]
        args += ["--prune-blocks", str(a.prune_blocks)] if a.prune_blocks else []
        args += ["--threads", str(a.threads)] if a.threads else []
        subprocess.run(args, check=True)
        results["runs"].append(json.loads(out.read_text()))
    report(results)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))
    if not a.keep:
        import shutil

        shutil.rmtree(model, ignore_errors=True)


def report(results: dict) -> None:
    size = results["model_bytes"]
    print(
        f"\n{results['shape']} x {results['blocks']} blocks, {results['dtype']}: {size / 1e9:.2f} GB on disk; "
        f"host RAM {results['host_ram_bytes'] / 1e9:.1f} GB; calibration {results['nsamples']} x {results['seqlen']}"
    )
    for r in results["runs"]:
        peak = r["peak"]
        line = (
            f"  {r['runner']:>14}: prune {r['prune_seconds']:.1f} s; peak RSS {peak['VmRSS'] / 1e9:.2f} GB "
            f"({peak['VmRSS'] / size:.2f}x the model), peak anonymous {peak['RssAnon'] / 1e9:.2f} GB "
            f"({peak['RssAnon'] / size:.2f}x)"
        )
        if r.get("prune_seconds_per_billion"):
            line += f"; {r['prune_seconds_per_billion']:.1f} s per billion pruned block parameters"
        if r.get("peak_gpu_bytes"):
            line += f"; peak GPU {r['peak_gpu_bytes'] / 1e9:.2f} GB"
        print(line)
    if len(results["runs"]) == 2 and results["prune_blocks"] is None:  # the peer prunes every block
        ours, peer = results["runs"]
        print(
            f"  engine / llm-compressor: prune time {ours['prune_seconds'] / peer['prune_seconds']:.2f}x, "
            f"peak GPU {ours['peak_gpu_bytes'] / peer['peak_gpu_bytes']:.2f}x"
        )


if __name__ == "__main__":
    main()
