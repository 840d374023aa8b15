"""The job page of a finished mixture-of-experts job (with a refit), in headless Chromium against the real service and
worker: the sparsity over all weights of the pruned blocks beside the pruned modules' figure, and the
weights left dense (the routers) by name with their reason."""

from __future__ import annotations

import pytest
import torch
import transformers
from playwright.sync_api import expect

from tests.support.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_job_page_shows_both_sparsities_and_the_dense_weights(page, dashboard, allowed_dir):
    model = allowed_dir / "mixtral"
    if not model.exists():
        make_tiny_model(model, "mixtral")
    body = {
        "model": str(model),
        "sparsity": 0.5,
        "dtype": "float32",
        "moe": {"min_tokens": 0},
        "solver": {"refit": "reconstruct"},
        "calibration": {"dataset": str(allowed_dir / "valid.txt"), "nsamples": 4, "seqlen": 32},
        "evaluation": {"datasets": []},
    }
    created = dashboard.client.post("/api/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    try:
        job = dashboard.wait_done(created.json()["id"], 150)
        assert job["status"] == "succeeded", job

        dense = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        weights = {n: p.numel() for n, p in dense.model.layers.named_parameters() if p.dim() >= 2}
        routers = sum(n for name, n in weights.items() if name.endswith("mlp.gate.weight"))
        expected_all = 0.5 * (sum(weights.values()) - routers) / sum(weights.values())

        result = job["result"]
        assert result["sparsity_pruned_modules"] == pytest.approx(0.5, abs=2e-4)  # SparseGPT's ties: a few more
        assert result["sparsity"] == pytest.approx(expected_all, abs=2e-4) and result["sparsity"] < 0.499

        page.goto(f"/jobs/{job['id']}")
        expect(page.locator("#sparsity-pruned")).to_have_text(f"{100 * result['sparsity_pruned_modules']:.2f}%")
        expect(page.locator("#sparsity-all")).to_have_text(f"{100 * result['sparsity']:.2f}%")
        # the whole model: the blocks' zeros over every parameter (embeddings, head, norms: dense)
        every = sum(p.numel() for p in dense.parameters())
        assert result["coverage"]["model_parameters"] == every
        whole = float(page.locator("#sparsity-model").inner_text().rstrip("%"))
        assert whole == pytest.approx(100 * expected_all * sum(weights.values()) / every, abs=0.02)  # ties, as above
        page.click("#dense-weights summary")
        rows = page.locator("#dense-weights tbody tr")
        expect(rows).to_have_count(2)
        for i in range(2):
            expect(rows.nth(i)).to_contain_text(f"model.layers.{i}.mlp.gate.weight")
            expect(rows.nth(i)).to_contain_text("router")
        expect(page.locator("#results")).to_contain_text("8 experts one by one")
        # The refit reached every pruned layer, the experts' fused parameters included, and the page says so.
        fit = result["refit"]
        assert fit["layers"] == len(job["modules"]) and fit["not_refit"] == []
        expect(page.locator("#refit-summary")).to_contain_text(
            f"Refit reconstruct: mean reconstruction error "
            f"{fit['error_before']:.4f} → {fit['error_after']:.4f} "
            f"over {fit['layers']} layers"
        )
        expect(page.locator("#refit-summary")).not_to_contain_text("Left without a refit")
    finally:  # the dashboard service is shared by the session's browser tests, which count the jobs they see
        deleted = dashboard.client.delete(f"/api/v1/jobs/{created.json()['id']}")
    assert deleted.status_code == 204
