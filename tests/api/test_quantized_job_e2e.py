"""A quantizing job end to end with real processes (issue 26): the API and a worker run 50% +
W4A16 group 32 on the tiny LLaMA; the job offers two artifacts, compressed-tensors (the default
download) and dense, each whole and by Range with its ratio to the dense fp16 size; the
compressed-tensors one loads with ``AutoModelForCausalLM.from_pretrained`` and no arguments, and
its perplexity on the job's evaluation windows, computed here directly, is the job's reported
one; ``sparsegpt pull`` fetches the default and ``--format dense``; the job page in Chromium shows
both formats with sizes and ratios (screenshot under test-artifacts/dashboard/)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import pytest

from tests.api.test_pull import pull
from tests.support.stacks import job_body

pytestmark = pytest.mark.slow
SCHEME = {"scheme": "W4A16", "group_size": 32, "actorder": False}


def direct_perplexity(model_dir, text_file, seqlen: int, max_windows: int):
    """(exp(mean over windows of the mean next-token cross-entropy), the model): a whole-model forward per window."""
    import torch
    import transformers

    from worker.engine.calibration import evaluation_windows

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # no extra arguments
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    windows = evaluation_windows(tokenizer, str(text_file), seqlen=seqlen, max_windows=max_windows)
    nlls = []
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()
            nlls.append(torch.nn.functional.cross_entropy(logits, window[1:]).item())
    return math.exp(sum(nlls) / len(nlls)), model


def test_quantizing_job_offers_two_formats(make_stack, module_redis, models_dir, tmp_path, browser):
    stack = make_stack(module_redis.url)
    stack.start_api()
    stack.start_worker("quant")
    text = models_dir / "calib.txt"
    body = job_body(
        models_dir,
        sparsity=0.5,
        quantization=SCHEME,
        calibration={"dataset": str(text), "nsamples": 4, "seqlen": 32},
        evaluation={"datasets": [str(text)], "max_windows": 2},
    )
    with stack.client() as c:
        created = c.post("/api/v1/jobs", json=body)
        assert created.status_code == 201, created.text
    job = stack.wait(created.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    job_id = job["id"]

    listed = {a["format"]: a for a in job["artifacts"]}
    assert list(listed) == ["compressed-tensors", "dense"]
    sizes = job["result"]["quantization"]["sizes"]
    for name, entry in listed.items():  # each with its ratio: the report's, the saved directory over fp16
        assert entry["ratio"] == pytest.approx(sizes["formats"][name]["ratio"]) and entry["ratio"] > 0
        assert entry["file_name"] == f"sparsegpt-job-{job_id}-{name}.tar"
    assert listed["compressed-tensors"]["size"] < listed["dense"]["size"]
    assert listed["compressed-tensors"]["ratio"] < listed["dense"]["ratio"]
    assert job["artifact"]["sha256"] == listed["compressed-tensors"]["sha256"]  # the default download

    with stack.client() as c:
        default = c.get(job["artifact"]["url"])
        assert default.status_code == 200 and hashlib.sha256(default.content).hexdigest() == job["artifact"]["sha256"]
        for name, entry in listed.items():
            whole = c.get(entry["url"])
            assert whole.status_code == 200 and len(whole.content) == entry["size"]
            assert hashlib.sha256(whole.content).hexdigest() == entry["sha256"]
            lo, hi = entry["size"] // 3, entry["size"] // 3 + 4095
            part = c.get(entry["url"], headers={"Range": f"bytes={lo}-{hi}"})
            assert part.status_code == 206 and part.content == whole.content[lo : hi + 1]
            with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
                tar.extractall(tmp_path / name, filter="data")
        assert default.content == c.get(listed["compressed-tensors"]["url"]).content

    ct_dir = tmp_path / "compressed-tensors" / f"sparsegpt-job-{job_id}-compressed-tensors"
    config = json.loads((ct_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    [metric] = job["metrics"]
    ppl, model = direct_perplexity(ct_dir, text, seqlen=32, max_windows=2)
    assert ppl == pytest.approx(metric["perplexity"], rel=1e-4), (ppl, metric)
    dense_dir = tmp_path / "dense" / f"sparsegpt-job-{job_id}-dense"
    assert "quantization_config" not in json.loads((dense_dir / "config.json").read_text())

    # pull: the default format without --format, the float one with --format dense
    got = pull(stack, job_id, tmp_path / "pulled", token=stack.token or None)
    assert got.returncode == 0, got.stderr
    assert json.loads((tmp_path / "pulled" / "config.json").read_text())["quantization_config"]
    got = pull(stack, job_id, tmp_path / "pulled-dense", "--format", "dense", token=stack.token or None)
    assert got.returncode == 0, got.stderr
    assert sorted(p.name for p in (tmp_path / "pulled-dense").iterdir()) == sorted(p.name for p in dense_dir.iterdir())

    # the job page: both formats with their sizes and ratios, the note on what brings size and speed
    from tests.support.browser import shot

    signed_in = {"Authorization": f"Bearer {stack.token}"} if stack.token else {}
    context = browser.new_context(
        base_url=stack.base, viewport={"width": 1360, "height": 900}, extra_http_headers=signed_in
    )
    try:
        page = context.new_page()
        page.goto(f"/jobs/{job_id}")
        rows = page.locator("#artifact-formats tbody tr")
        assert rows.count() == 2
        for name, entry in listed.items():
            row = page.locator(f'#artifact-formats tr[data-format="{name}"]')
            assert row.locator("td[data-bytes]").get_attribute("data-bytes") == str(entry["size"])
            assert row.locator('td[data-role="ratio"]').inner_text() == f"×{entry['ratio']:.2f}"
        note = page.locator("#dense-note").inner_text()
        assert "sparsity alone brings no size or speed" in note and "NVIDIA" not in note
        assert "W4A16 g32" in page.locator(".subtitle").inner_text()
        shot(page, "job-quantized-formats")
    finally:
        context.close()
