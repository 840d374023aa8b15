"""Routing by GPU: workers advertise their GPU memory (``sparsegpt worker --gpu-memory-gb``), the
API sends a job to a queue only workers that fit it consume, and refuses (422, with the numbers) a
job no live worker can take. ``choose_queue`` on its own with the real estimate, then real
processes: an API and two workers (24 GB and 80 GB advertised) on PostgreSQL and Redis."""

from __future__ import annotations

import json
import time

import pytest

from app.config import Settings
from app.services.routing import choose_queue, gpu_need_gb
from worker.engine.contract.estimate import JobSize, estimate

# A LLaMA-shaped config of 2 blocks at 70B's width: what the API estimates from (no weights).
WIDE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 2,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def worker(name: str, memory: float | None, base: str = "q") -> dict:
    from worker.gpus import queues_for

    return {"name": name, "memory_gb": memory, "queues": [base, *queues_for(base, memory)], "seen_s_ago": 1.0}


def test_choose_queue_by_estimate_and_request():
    settings = Settings(_env_file=None, queue="q", redis_url="redis://127.0.0.1:1/0")
    small, big = worker("small@h", 25.8), worker("big@h", 85.5)
    cpu = worker("cpu@h", None)
    wide = estimate(WIDE, JobSize(method="sparsegpt", nsamples=512, seqlen=2048, dtype="float32", device="cpu"))
    need = gpu_need_gb(wide)
    assert 25.8 < need < 85.5, need  # activations 512 x 2048 x 8192 x 4 B = 34 GB + a block's Hessians
    queue, refusal = choose_queue(settings, {}, wide, [small, big, cpu])
    assert refusal is None and queue in big["queues"] and queue not in small["queues"], queue
    # A small job: a tier both GPU workers consume; asking for 40 GB: the big one's only.
    tiny = estimate(WIDE, JobSize(method="sparsegpt", nsamples=1, seqlen=128, dtype="float32", device="cpu"))
    queue, refusal = choose_queue(settings, {}, tiny, [small, big])
    assert refusal is None and queue in small["queues"] and queue in big["queues"]
    queue, refusal = choose_queue(settings, {"min_gpu_memory_gb": 40}, tiny, [small, big])
    assert refusal is None and queue == "q.gpu40gb" and queue not in small["queues"]
    # Nothing fits: the numbers, not a wait.
    queue, refusal = choose_queue(settings, {"min_gpu_memory_gb": 100}, tiny, [small, big])
    assert "no live worker can take this job" in refusal and "100 GB" in refusal and "86 GB" in refusal
    queue, refusal = choose_queue(settings, {}, wide, [small])
    assert (
        "no live worker can take this job" in refusal and "estimate" in refusal and "calibration activations" in refusal
    )
    # Between tiers (a 90 GB need, tiers 80 and 96): the whole-GB queue of the worker that fits.
    fat = worker("fat@h", 91.2)
    queue, refusal = choose_queue(settings, {"min_gpu_memory_gb": 90}, None, [big, fat])
    assert refusal is None and queue == "q.gpu91gb" and queue in fat["queues"]
    # CPU-only workers: the shared queue, as on one machine; asking for a GPU is refused.
    assert choose_queue(settings, {}, tiny, [cpu]) == ("q", None)
    assert "no live worker advertises a GPU" in choose_queue(settings, {"min_gpu_memory_gb": 8}, tiny, [cpu])[1]
    # A named queue: only if some live worker consumes it.
    assert choose_queue(settings, {"queue": "q.gpu80gb"}, tiny, [small, big]) == ("q.gpu80gb", None)
    assert "no live worker consumes the queue 'special'" in choose_queue(settings, {"queue": "special"}, tiny, [big])[1]


def test_one_gpu_worker_does_not_draw_plain_jobs_from_the_cpu_workers():
    """A job that asks for no GPU goes to a queue every worker that fits it consumes: with a CPU
    worker live, the shared queue (or, when some GPU worker is too small, the plain tier queue the
    CPU workers and the big GPU workers consume), never a GPU-only tier queue."""
    settings = Settings(_env_file=None, queue="q", redis_url="redis://127.0.0.1:1/0")
    small, big, cpu = worker("small@h", 25.8), worker("big@h", 85.5), worker("cpu@h", None)
    tiny = estimate(WIDE, JobSize(method="sparsegpt", nsamples=1, seqlen=128, dtype="float32", device="cpu"))
    queue, refusal = choose_queue(settings, {}, tiny, [big, cpu])
    assert refusal is None and queue in cpu["queues"] and queue in big["queues"], queue
    wide = estimate(WIDE, JobSize(method="sparsegpt", nsamples=512, seqlen=2048, dtype="float32", device="cpu"))
    queue, refusal = choose_queue(settings, {}, wide, [small, big, cpu])
    assert refusal is None and queue in cpu["queues"] and queue in big["queues"] and queue not in small["queues"], queue
    # Asking for GPU memory still goes to the GPU workers only; without CPU workers nothing changes.
    queue, refusal = choose_queue(settings, {"min_gpu_memory_gb": 8}, tiny, [big, cpu])
    assert refusal is None and queue not in cpu["queues"] and queue in big["queues"], queue
    assert choose_queue(settings, {}, tiny, [small, big])[0] not in cpu["queues"]


def start_gpu_worker(stack, name: str, memory_gb: float):
    from tests.support.processes import spawn

    proc = spawn(
        [
            "worker",
            f"--hostname={name}@%h",
            "--loglevel=info",
            f"--gpu-memory-gb={memory_gb}",
            f"--gpu-name=Test {int(memory_gb)}GB",
        ],
        stack.env,
        stack.logs / f"worker-{name}.log",
    )
    stack.workers.append(proc)
    with stack.client() as c:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.popen.poll() is None, proc.tail()
            if any(w["name"].startswith(f"{name}@") for w in c.get("/api/v1/workers").json()["items"]):
                return proc
            time.sleep(0.2)
    raise AssertionError(proc.tail())


@pytest.mark.slow
def test_jobs_go_to_the_worker_that_fits(make_stack, redis_server, models_dir, tmp_path):
    from tests.support.stacks import job_body, slow_body

    wide = models_dir.parent / f"wide-{tmp_path.name}"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps(WIDE))
    (wide / "tokenizer.json").write_text("{}")  # a loadable directory at submit (app/services/specs.py)
    (wide / "model.safetensors").touch()  # (the API only sees that it has weights)
    stack = make_stack(redis_server.url, local_dirs=f"{models_dir}:{wide}", max_job_memory_gb=0)
    stack.start_api()
    start_gpu_worker(stack, "small", 24)
    start_gpu_worker(stack, "big", 80)
    with stack.client() as c:
        listed = {w["name"].split("@")[0]: w for w in c.get("/api/v1/workers").json()["items"]}
        assert listed["small"]["memory_gb"] == 24 and listed["big"]["gpus"][0]["name"] == "Test 80GB"
        assert stack.env["SPARSEGPT_QUEUE"] + ".gpu40gb" in listed["big"]["queues"]
        assert stack.env["SPARSEGPT_QUEUE"] + ".gpu40gb" not in listed["small"]["queues"]
        # Asked for 40 GB: the 80 GB worker runs it, and the list shows it as its current job.
        first = c.post("/api/v1/jobs", json={**slow_body(models_dir), "resources": {"min_gpu_memory_gb": 40}})
        assert first.status_code == 201, first.text
        job_id = first.json()["id"]
        assert first.json()["queue"] == stack.env["SPARSEGPT_QUEUE"] + ".gpu40gb"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            listed = {w["name"].split("@")[0]: w for w in c.get("/api/v1/workers").json()["items"]}
            if listed["big"]["current_jobs"] == [job_id]:
                break
            time.sleep(0.2)
        assert listed["big"]["current_jobs"] == [job_id] and listed["small"]["current_jobs"] == []
        # Queued behind it on the same tier: a live worker takes that queue, so its page warns of nothing.
        behind = c.post("/api/v1/jobs", json={**job_body(models_dir), "resources": {"min_gpu_memory_gb": 40}}).json()
        if behind["status"] == "queued":
            assert 'id="no-worker"' not in c.get(f"/jobs/{behind['id']}").text
        page = c.get("/workers")
        assert page.status_code == 200 and "Test 80GB" in page.text and f'href="/jobs/{job_id}"' in page.text
        # By its estimate alone (34 GB of activations): the 80 GB worker (the model has no weights: it fails there).
        wide_job = c.post(
            "/api/v1/jobs",
            json={
                "model": str(wide),
                "sparsity": 0.5,
                "dtype": "float32",
                "calibration": {"dataset": str(models_dir / "calib.txt"), "nsamples": 512, "seqlen": 2048},
            },
        )
        assert wide_job.status_code == 201, wide_job.text
        # Nothing fits: 422 with the numbers, nothing queued.
        refused = c.post("/api/v1/jobs", json={**job_body(models_dir), "resources": {"min_gpu_memory_gb": 100}})
        assert refused.status_code == 422 and "largest GPU of a live worker has 80 GB" in refused.text, refused.text
        unknown = c.post("/api/v1/jobs", json={**job_body(models_dir), "resources": {"queue": "nobody-here"}})
        assert unknown.status_code == 422 and "no live worker consumes the queue" in unknown.text
        small_job = c.post("/api/v1/jobs", json=job_body(models_dir)).json()["id"]
    done = stack.wait(job_id, timeout=240)
    assert done["status"] == "succeeded" and done["worker"].startswith("big@"), done
    wide_done = stack.wait(wide_job.json()["id"], timeout=120)
    assert wide_done["worker"].startswith("big@") and wide_done["status"] == "failed", wide_done
    assert stack.wait(small_job, timeout=120)["status"] == "succeeded"
    assert stack.wait(behind["id"], timeout=120)["status"] == "succeeded"
