"""What a worker advertises: nvidia-smi's CSV read into GPUs (the ones CUDA_VISIBLE_DEVICES
names), the advertised override, CPU-only, and the tier queues its memory admits."""

from __future__ import annotations

from app.routing_tiers import TIERS, plain_queue, tier_queue
from worker.gpus import describe, parse_nvidia_smi, queues_for

# nvidia-smi 550 on a two-GPU machine (H200 and A100 40GB; a name with a comma, as some have).
OUTPUT = """0, GPU-0f3c2a10-aaaa-bbbb-cccc-000000000000, NVIDIA H200, 143771
1, GPU-7d1e9b22-aaaa-bbbb-cccc-111111111111, NVIDIA A100-SXM4-40GB, 40960
2, GPU-99999999-aaaa-bbbb-cccc-222222222222, Tesla T4, Special, 15360
"""


def test_nvidia_smi_output_and_visible_devices():
    every = parse_nvidia_smi(OUTPUT, None)
    assert [(g["name"], g["memory_gb"]) for g in every] == [
        ("NVIDIA H200", 150.8),
        ("NVIDIA A100-SXM4-40GB", 42.9),
        ("Tesla T4, Special", 16.1),
    ]
    assert [g["index"] for g in parse_nvidia_smi(OUTPUT, "1")] == ["1"]
    assert [g["index"] for g in parse_nvidia_smi(OUTPUT, "2,0")] == ["2", "0"]
    assert [g["index"] for g in parse_nvidia_smi(OUTPUT, "GPU-7d1e9b22-aaaa-bbbb-cccc-111111111111")] == ["1"]
    assert parse_nvidia_smi(OUTPUT, "") == [] and parse_nvidia_smi("", None) == []


def test_advertised_cpu_only_and_tier_queues():
    told = describe(advertised_gb=24, advertised_name="RTX 4090", device="auto")
    assert told["gpu_count"] == 1 and told["memory_gb"] == 24 and told["gpus"][0]["name"] == "RTX 4090"
    cpu = describe(device="cpu")
    assert cpu == {"gpus": [], "gpu_count": 0, "memory_gb": None, "device": "cpu"}
    # A CPU-only worker consumes every plain queue and no GPU tier; a GPU worker the plain ones it fits.
    assert queues_for("q", None) == [plain_queue("q", t) for t in TIERS]
    assert plain_queue("q", 24) in queues_for("q", 25.8) and plain_queue("q", 32) not in queues_for("q", 25.8)
    h200 = queues_for("q", 150.8)
    assert tier_queue("q", 141) in h200 and tier_queue("q", 150) in h200 and tier_queue("q", 192) not in h200
    a100 = queues_for("q", 42.9)
    assert a100[-1] == tier_queue("q", 42) and tier_queue("q", 40) in a100 and tier_queue("q", 48) not in a100
