"""Job size, checked before a job is queued (issue 11, item 9): calibration tokens
(nsamples x seqlen) and evaluation windows under the server's caps, and the job's memory
estimate (from the model's config.json) under SPARSEGPT_MAX_JOB_MEMORY_GB. The API and the
dashboard's form answer 422 naming the numbers and the setting; nothing is queued.

A real API process (`sparsegpt serve --workers 0`, SQLite, single-user mode on loopback) over
HTTP, its queue read by no worker. The allowed directory holds config.json files of real model
sizes (LLaMA-7B, LLaMA-2-70B; no weights: the API reads the config alone)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import base_env, free_port, serve_api
from worker.engine.contract.estimate import JobSize, estimate

LLAMA_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
LLAMA_70B = {
    **LLAMA_7B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
}
LLAMA3_70B = {**LLAMA_70B, "vocab_size": 128256, "torch_dtype": "bfloat16"}  # stored in bf16, as shipped
HOSTILE = {**LLAMA_7B, "hidden_size": 10**400}  # json.dumps writes it, json.loads reads it back
MAX_SIZE = 2**31 - 1  # the largest size a config may give
HUB_MODEL = "org/name"  # offline (HF_HUB_OFFLINE=1): its config cannot be read, the worker checks it


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    for name, config in {
        "llama-7b": LLAMA_7B,
        "llama-70b": LLAMA_70B,
        "hostile": HOSTILE,
        "llama3-70b": LLAMA3_70B,
    }.items():
        (root / name).mkdir()
        if name != "llama3-70b":  # a config that names no dtype: the weights are converted into host memory
            config = {k: v for k, v in config.items() if k != "torch_dtype"}
        (root / name / "config.json").write_text(json.dumps(config))
        (root / name / "tokenizer.json").write_text("{}")  # a loadable directory at submit (specs.py)
        (root / name / "model-00001-of-00030.safetensors").touch()  # (the API only sees that it has them)
    nested = root / "nested"  # a config.json nested deeper than json.loads recurses (RecursionError: was a 500)
    nested.mkdir()
    depth = 200_000
    (nested / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}")
    (nested / "tokenizer.json").write_text("{}")
    (nested / "model.safetensors").touch()
    return root


@pytest.fixture(scope="module")
def api(module_redis, allowed, tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("job-size")
    env = base_env(
        SPARSEGPT_DATA_DIR=str(tmp / "data"),
        REDIS_URL=module_redis.url,
        SPARSEGPT_AUTH="off",
        SPARSEGPT_LOCAL_DIRS=str(allowed),
        SPARSEGPT_QUEUE=f"idle-{free_port()}",
        SPARSEGPT_MAX_ACTIVE_JOBS_PER_USER="0",
        # The deployment's defaults (a GPU worker: fp16 for dtype auto), spelled out.
        SPARSEGPT_WORKER_DEVICE="auto",
        SPARSEGPT_MAX_NSAMPLES="4096",
        SPARSEGPT_MAX_SEQLEN="32768",
        SPARSEGPT_MAX_CALIBRATION_TOKENS=str(4096 * 2048),
        SPARSEGPT_MAX_EVAL_WINDOWS="4096",
        SPARSEGPT_MAX_JOB_MEMORY_GB="80",
    )
    with serve_api(env, tmp / "api.log") as (base, _port, _proc):
        yield base


@pytest.fixture
def client(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, timeout=30) as c:
        yield c


def body(model: str = HUB_MODEL, *, nsamples: int = 128, seqlen: int | None = 2048, **changes) -> dict:
    spec = {
        "model": model,
        "sparsity": "2:4",
        "calibration": {"dataset": "c4", "nsamples": nsamples, "seqlen": seqlen},
        "evaluation": {"datasets": ["wikitext2"]},
    }
    spec.update(changes)
    return spec


def refusal(response: httpx.Response) -> tuple[list, str]:
    assert response.status_code == 422, (response.status_code, response.text[:2000])
    detail = response.json()["detail"]
    return [d.get("loc") for d in detail], " | ".join(d["msg"] for d in detail)


def test_calibration_tokens_are_capped(client):
    """4096 samples and 32768 tokens were each under their cap: 1.1 TB of fp16 activations at
    hidden 4096. Their product is capped now; at the cap, the job is queued."""
    locs, msg = refusal(client.post("/api/v1/jobs", json=body(nsamples=4096, seqlen=32768)))
    assert locs == [["body", "calibration", "nsamples"]]
    assert "nsamples 4,096 x seqlen 32,768 = 134,217,728 calibration tokens" in msg
    assert "limit of 8,388,608 (SPARSEGPT_MAX_CALIBRATION_TOKENS)" in msg and "lower nsamples or seqlen" in msg
    # No seqlen: the engine's default of 2048 counts.
    _, msg = refusal(client.post("/api/v1/jobs", json=body(nsamples=4097, seqlen=None)))
    assert "seqlen 2,048 (the default)" in msg
    accepted = client.post("/api/v1/jobs", json=body(nsamples=4096, seqlen=2048))
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["status"] == "queued"


@pytest.mark.parametrize("windows", [4097, 10**40, 10**400], ids=["4097", "1e40", "1e400"])
def test_evaluation_windows_are_capped(client, windows):
    """evaluation.max_windows had no cap (10**40 was accepted); a huge integer is a 422, not a
    500, and is not echoed back in full."""
    response = client.post("/api/v1/jobs", json=body(evaluation={"datasets": ["wikitext2"], "max_windows": windows}))
    locs, msg = refusal(response)
    assert ["body", "evaluation", "max_windows"] in locs
    assert str(10**40) not in response.text
    if windows < 10**300:  # (the edge may refuse a 400-digit number before the spec sees it)
        assert "above this server's limit of 4,096 windows per set (SPARSEGPT_MAX_EVAL_WINDOWS)" in msg
    ok = client.post("/api/v1/jobs", json=body(evaluation={"datasets": ["wikitext2"], "max_windows": 4096}))
    assert ok.status_code == 201, ok.text


def test_memory_estimate_refuses_what_no_worker_can_hold(client, allowed):
    """LLaMA-7B, within both caps (4096 x 2048 tokens) and fp16: 69 GB of activations, 13 GB of
    weights, a block's Hessians and solve: above the 80 GB a worker gives a job."""
    model = str(allowed / "llama-7b")
    locs, msg = refusal(client.post("/api/v1/jobs", json=body(model, nsamples=4096, seqlen=2048)))
    assert locs == [["body", "calibration", "nsamples"]]
    numbers = re.search(
        r"this job needs about (\d+) GB \(calibration activations (\d+) GB = 4096 samples x 2048 tokens "
        r"x 4096 hidden x 2 bytes \(float16\); model weights (\d+) GB = 6.74 B parameters",
        msg,
    )
    assert numbers, msg
    total, activations, weights = map(int, numbers.groups())
    assert activations == 69 and weights == 13 and 82 <= total <= 95, msg
    assert "but a worker gives a job at most 80 GB (SPARSEGPT_MAX_JOB_MEMORY_GB); lower nsamples or seqlen" in msg
    # float32 doubles it; fewer samples fit.
    _, msg = refusal(client.post("/api/v1/jobs", json=body(model, nsamples=2048, seqlen=2048, dtype="float32")))
    assert "2048 samples x 2048 tokens x 4096 hidden x 4 bytes (float32)" in msg
    fits = client.post("/api/v1/jobs", json=body(model, nsamples=2048, seqlen=2048))
    assert fits.status_code == 201, fits.text


def test_memory_estimate_of_the_model_itself(client, allowed):
    """LLaMA-2-70B's fp16 weights alone are 138 GB: refused on the model, whatever the samples."""
    locs, msg = refusal(client.post("/api/v1/jobs", json=body(str(allowed / "llama-70b"), nsamples=8, seqlen=512)))
    assert locs == [["body", "model"]]
    assert re.search(r"model weights 13\d GB = 69 B parameters x 2 bytes \(float16\)", msg), msg
    assert "use a smaller model" in msg and "SPARSEGPT_MAX_JOB_MEMORY_GB" in msg


def test_a_70b_model_kept_memory_mapped_fits_and_a_converted_one_is_refused(client, allowed):
    """Llama-3-70B stored in bf16, dtype auto on a GPU worker: loaded in bf16, its 141 GB of
    block weights stay memory-mapped from its safetensors (only the embeddings and head count):
    queued under the 80 GB a job gets. Asked for fp16, transformers would convert every weight
    into host memory: refused on dtype, saying which dtype keeps them mapped."""
    model = str(allowed / "llama3-70b")
    fits = client.post("/api/v1/jobs", json=body(model, nsamples=128, seqlen=2048))
    assert fits.status_code == 201, fits.text
    locs, msg = refusal(client.post("/api/v1/jobs", json=body(model, nsamples=128, seqlen=2048, dtype="float16")))
    assert locs == [["body", "dtype"]]
    assert re.search(r"model weights 14\d GB = 70.6 B parameters x 2 bytes \(float16\), in host memory", msg), msg
    assert "set dtype to bfloat16 (or auto on a GPU), the dtype its checkpoint stores" in msg, msg


def test_the_mapped_estimate_counts_what_lies_outside_the_blocks():
    """The numbers behind the test above, against a direct computation."""
    job = JobSize("sparsegpt", 128, 2048, "bfloat16", "cuda", mapped=True, stored="bfloat16")
    mapped = estimate(LLAMA3_70B, job)
    converted = estimate(LLAMA3_70B, JobSize("sparsegpt", 128, 2048, "float16", "cuda", stored="bfloat16"))
    h, i, layers, vocab = 8192, 28672, 80, 128256
    block = 2 * h * h + 2 * h * 1024 + 3 * h * i  # q, o; k, v (8 kv heads x 128); gate, up, down
    assert converted.weights == 2 * (layers * block + 2 * vocab * h)
    assert mapped.weights == 2 * (2 * vocab * h)  # embeddings and an untied head
    assert mapped.total - mapped.weights == converted.total - converted.weights
    assert "the blocks' 137 GB stay memory-mapped from the checkpoint's files (not counted)" in "; ".join(mapped.parts)
    assert mapped.refusal(80) is None and converted.field == ("dtype",)


@pytest.mark.parametrize(
    ("spec_dtype", "device", "stored", "expected"),
    [
        ("auto", "cuda", "bfloat16", "bfloat16"),
        ("auto", "cuda", "float16", "float16"),
        ("auto", "cuda", "float32", "float16"),
        ("auto", "cuda", None, "float16"),
        ("auto", "cpu", "bfloat16", "float32"),
        ("bfloat16", "cpu", "float16", "bfloat16"),
    ],
)
def test_dtype_auto_follows_the_checkpoint_on_a_gpu(spec_dtype, device, stored, expected):
    from worker.engine.contract.spec import stored_dtype, working_dtype

    assert working_dtype(spec_dtype, device, stored) == expected
    assert stored_dtype({"torch_dtype": stored}) == stored and stored_dtype({"dtype": stored}) == stored
    assert (
        stored_dtype({"text_config": {"dtype": "bfloat16"}}) == "bfloat16" and stored_dtype({"dtype": "int8"}) is None
    )


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "llama4_text", "llama"])
def test_the_estimate_counts_the_weights_transformers_builds(family):
    """Mixture-of-experts shapes: experts of their own width (moe_intermediate_size) and shared
    experts; the count from config.json equals the model transformers builds from it (every 2-D+
    weight but the routers', which the estimate leaves out: h x experts)."""
    import torch
    import transformers

    own = {
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},  # (each family's own fields only)
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        "qwen2_moe": {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
        "llama4_text": {
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "intermediate_size_mlp": 80,
            "interleave_moe_layer_step": 1,
        },
        "llama": {},
    }[family]
    config = transformers.AutoConfig.for_model(
        family,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=300,
        tie_word_embeddings=False,
        **own,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    built = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not n.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "router.weight"))
    )
    from worker.engine.contract.estimate import ModelShape

    assert ModelShape.from_config(config.to_dict()).params == built


def test_a_queued_job_no_live_worker_takes_says_so_on_its_page(client):
    """No worker consumes this server's queue: the job page says what the job waits for."""
    job = client.post("/api/v1/jobs", json=body(nsamples=8, seqlen=512))
    assert job.status_code == 201, job.text
    page = client.get(f"/jobs/{job.json()['id']}")
    assert page.status_code == 200
    note = re.search(r'id="no-worker"><strong>Nothing will run this job now</strong>: (.*?)</div>', page.text, re.S)
    assert note and "no live worker takes jobs from its queue &#39;idle-" in note.group(1), page.text[-3000:]
    assert "(live workers: none)" in note.group(1) and "sparsegpt worker --queue idle-" in note.group(1)


def test_a_hub_model_whose_config_cannot_be_read_is_left_to_the_worker(client):
    """Offline, the Hub's config.json cannot be fetched: the caps still apply, the estimate is
    the worker's (tests/worker/test_oom.py)."""
    response = client.post("/api/v1/jobs", json=body(HUB_MODEL, nsamples=4096, seqlen=2048))
    assert response.status_code == 201, response.text


def test_the_dashboard_form_refuses_with_the_numbers(api, allowed):
    """The new-job form: the same checks, shown by the nsamples field, values kept."""
    with httpx.Client(base_url=api, headers={"Origin": api, "Accept": "text/html"}, timeout=30) as browser:
        page = browser.get("/jobs/new")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        form = {
            "csrf_token": token,
            "model": str(allowed / "llama-7b"),
            "sparsity": "2:4",
            "method": "sparsegpt",
            "calibration_source": "c4",
            "nsamples": "4096",
            "seqlen": "2048",
            "eval_sets": "wikitext2",
            "dtype": "auto",
            "blocksize": "128",
            "percdamp": "0.01",
            "seed": "0",
        }
        response = browser.post("/jobs/new", data=form)
        assert response.status_code == 422, response.text[-2000:]
        assert "this job needs about" in response.text and "SPARSEGPT_MAX_JOB_MEMORY_GB" in response.text
        field = re.search(r'id="error-nsamples"[^>]*>(.*?)<', response.text, re.S)
        assert field and "4096 samples x 2048 tokens" in field.group(1), response.text[-3000:]

        form.update(model=HUB_MODEL, nsamples="4096", seqlen="32768")
        response = browser.post("/jobs/new", data=form)
        assert response.status_code == 422
        assert "134,217,728 calibration tokens" in response.text and "SPARSEGPT_MAX_CALIBRATION_TOKENS" in response.text
        assert 'value="32768"' in response.text  # what was typed comes back


def test_a_config_whose_sizes_are_no_sizes_is_refused_not_a_500(client, allowed):
    """config.json with "hidden_size": 10**400 (an OverflowError in the estimate's arithmetic:
    500) is a 422 on the model naming the field; the number is not echoed in full."""
    response = client.post("/api/v1/jobs", json=body(str(allowed / "hostile"), nsamples=8, seqlen=512))
    locs, msg = refusal(response)
    assert locs == [["body", "model"]]
    assert "config.json gives hidden_size = about 10^400, which is not a size (at most 2,147,483,647)" in msg, msg
    assert str(10**400) not in response.text
    assert client.get("/health").status_code == 200


def test_a_deeply_nested_config_is_refused_not_a_500(client, allowed):
    response = client.post("/api/v1/jobs", json=body(str(allowed / "nested"), nsamples=8, seqlen=512))
    locs, msg = refusal(response)
    assert locs == [["body", "model"]]
    assert "config.json is nested too deeply to be read" in msg, msg
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_local_experts",
    ],
)
@pytest.mark.parametrize("value", [MAX_SIZE + 1, 10**400], ids=["2**31", "1e400"])
def test_any_size_above_2_31_makes_the_config_unusable(field, value):
    found = estimate({**LLAMA_7B, field: value}, JobSize("sparsegpt", 128, 2048, "float16", "cuda"))
    assert found is not None and found.field == ("model",)
    assert found.refusal(80) == found.refusal(0) and f"gives {field} = " in found.refusal(80)


def test_what_is_no_size_is_still_ignored_as_before():
    """0, negative, null, float and string values count as not given (fallbacks apply); a huge
    context only caps the default seqlen: ignored. Sizes at the bound are fine."""
    job = JobSize("sparsegpt", 128, None, "float16", "cuda")
    plain = estimate(LLAMA_7B, job)
    for changes in (
        {"num_key_value_heads": -1},
        {"num_key_value_heads": None},
        {"num_key_value_heads": 32.0},
        {"max_position_embeddings": 10**400},
        {"head_dim": "big"},
    ):
        found = estimate({**LLAMA_7B, **changes}, job)
        assert found is not None and not found.problem and found.total == plain.total, changes
    assert estimate({**LLAMA_7B, "hidden_size": 1e400}, job) is None  # inf: no hidden size given
    big = estimate({**LLAMA_7B, "hidden_size": MAX_SIZE, "vocab_size": MAX_SIZE}, job)
    assert big is not None and not big.problem and "this job needs about" in big.refusal(80)
