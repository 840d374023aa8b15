"""What a worker has to run jobs on, as it advertises it in its registration (heartbeat):
its GPUs (name, memory) read with ``nvidia-smi`` (no torch, no CUDA context in the worker's main
process), or what ``sparsegpt worker --gpu-memory-gb`` says it has (tests, a card nvidia-smi
does not see); CPU-only when neither. And the queues that follow from its memory: a worker with
M GB consumes ``<queue>.gpu<T>gb`` for every tier T <= M (and its own rounded M), so a job the
API sends to the tier just above its need reaches only workers that fit it (app/services/routing.py).
A job that asked for no GPU may run on any worker that fits it: every worker consumes the
``<queue>.any<T>gb`` queues it fits (a CPU-only worker all of them: host memory is checked at
submit against SPARSEGPT_MAX_JOB_MEMORY_GB), so such a job never waits for a GPU while a CPU
worker is idle.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess

from app.routing_tiers import TIERS, plain_queue, tier_queues

MIB = 1024 * 1024
GB = 1e9


def nvidia_gpus(visible: str | None) -> list[dict]:
    """[{"index", "name", "memory_gb"}] of the GPUs this process may use (CUDA_VISIBLE_DEVICES as
    indices; UUIDs and MIG names are matched on the uuid column), [] without nvidia-smi."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        out = subprocess.run(
            [binary, "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out, visible)


def parse_nvidia_smi(out: str, visible: str | None) -> list[dict]:
    """The GPUs in ``nvidia-smi --query-gpu=index,uuid,name,memory.total --format=csv,noheader,nounits``
    output that ``visible`` (CUDA_VISIBLE_DEVICES) names, in its order."""
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, uuid, name, mib = parts[0], parts[1], ", ".join(parts[2:-1]), parts[-1]
        try:
            memory_gb = round(float(mib) * MIB / GB, 1)
        except ValueError:
            continue
        gpus.append({"index": index, "uuid": uuid, "name": name, "memory_gb": memory_gb})
    if visible is None:
        return gpus
    wanted = [v.strip() for v in visible.split(",") if v.strip()]
    return [g for w in wanted for g in gpus if w in (g["index"], g["uuid"])]


def describe(*, advertised_gb: float = 0.0, advertised_name: str = "", device: str = "auto") -> dict:
    """{"gpus": [...], "gpu_count": n, "memory_gb": the smallest GPU's memory (a job runs on one)
    or None (CPU-only), "device": the engine's device setting}."""
    if advertised_gb > 0:
        gpus = [
            {
                "index": os.environ.get("CUDA_VISIBLE_DEVICES") or "0",
                "name": advertised_name or "advertised",
                "memory_gb": round(advertised_gb, 1),
            }
        ]
    elif device == "cpu":
        gpus = []
    else:
        gpus = nvidia_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
    memory = min((g["memory_gb"] for g in gpus), default=None)
    return {"gpus": gpus, "gpu_count": len(gpus), "memory_gb": memory, "device": device}


def queues_for(base: str, memory_gb: float | None) -> list[str]:
    """The tier queues a worker with ``memory_gb`` consumes (a CPU-only worker: every plain one)."""
    if memory_gb is None or not math.isfinite(memory_gb) or memory_gb <= 0:
        return [plain_queue(base, t) for t in TIERS]
    return [plain_queue(base, t) for t in TIERS if t <= memory_gb] + tier_queues(base, memory_gb)
