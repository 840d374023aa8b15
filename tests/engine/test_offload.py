"""Where the weights live on the host (worker.engine.offload): the loaded model's safetensors
memory-mapped, never written; each pruned block re-pointed at its checkpoint file; an
evaluation pass gives every block its own mapped tensors back."""

from __future__ import annotations

import hashlib

import torch

from tests.support.tiny_models import make_tiny_model
from worker.engine.architectures import LayerSelection, adapter_for
from worker.engine.checkpoint import load_model
from worker.engine.contract.patterns import parse_sparsity
from worker.engine.progress import Tracker
from worker.engine.resume import Checkpoints
from worker.engine.sequential import SolverSettings, perplexity, prune_sequential

CPU = torch.device("cpu")


def mapped_file(ptr: int) -> str | None:
    """The file whose mapping holds address ``ptr`` in this process (None: anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def block_files(adapter) -> list[set]:
    return [{mapped_file(p.data_ptr()) for p in block.parameters()} for block in adapter.blocks]


def test_pruned_blocks_live_in_their_checkpoint_files(tmp_path):
    model_dir = make_tiny_model(tmp_path / "llama", "llama", blocks=3)
    source = model_dir / "model.safetensors"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    model, _ = load_model(str(model_dir), dtype=torch.float32)
    adapter = adapter_for(model)
    assert block_files(adapter) == [{str(source)}] * 3, "the loader maps the weights (no host copy)"

    ids = torch.randint(1, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    tracker = Tracker(None, None, ["pruning"])
    before = perplexity(model, adapter, ids, device=CPU, batch_size=4, tracker=tracker)
    assert block_files(adapter) == [{str(source)}] * 3, "an evaluation pass gives the mapped tensors back"

    checkpoints = Checkpoints(tmp_path / "resume", {"test": 1})
    prune_sequential(
        model,
        adapter,
        ids,
        solver=SolverSettings(method="sparsegpt", pattern=parse_sparsity("0.5")),
        selection=LayerSelection(),
        device=CPU,
        batch_size=4,
        tracker=tracker,
        checkpoints=checkpoints,
    )
    assert block_files(adapter) == [{str(checkpoints.block_file(i))} for i in range(3)]
    for block in adapter.blocks:
        for name, p in block.named_parameters():
            if name.endswith("proj.weight"):
                assert 0.5 <= (p == 0).float().mean().item() < 0.51, name
    assert mapped_file(model.get_input_embeddings().weight.data_ptr()) == str(source)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest, "the model's own files are never written"
    after = perplexity(model, adapter, ids, device=CPU, batch_size=4, tracker=tracker)
    assert after != before


def test_the_loader_says_whether_the_weights_stay_mapped(tmp_path):
    """dtype auto on a GPU takes the checkpoint's own bf16 (or fp16; an fp32 checkpoint gets fp16),
    and ``sparsegpt_mapped``, which the memory estimate trusts, is True exactly when every block
    weight is a page of the model's safetensors file (read from /proc/self/maps), False when
    transformers converted them into anonymous memory."""
    import json

    fp32_dir = make_tiny_model(tmp_path / "fp32", "llama", blocks=2)
    model, _ = load_model(str(fp32_dir), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "bf16" / "tokenizer.json").write_bytes((fp32_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (fp32_dir / name).exists():
            (tmp_path / "bf16" / name).write_bytes((fp32_dir / name).read_bytes())

    cases = [
        (fp32_dir, torch.float32, torch.float32, True),
        (fp32_dir, None, torch.float16, False),
        (tmp_path / "bf16", None, torch.bfloat16, True),
        (tmp_path / "bf16", torch.float32, torch.float32, False),
    ]
    for directory, asked, working, mapped in cases:
        model, _ = load_model(str(directory), dtype=asked)
        assert model.sparsegpt_dtype == working and next(model.parameters()).dtype == working
        assert model.sparsegpt_mapped is mapped, (directory.name, asked)
        files = set().union(*block_files(adapter_for(model)))
        assert files == ({str(directory / "model.safetensors")} if mapped else {None}), (directory.name, asked, files)

    # A config that names another dtype than its files hold: the loader converts, and says so.
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    model, _ = load_model(str(tmp_path / "bf16"), dtype=torch.float32)
    assert model.sparsegpt_stored == "float32" and model.sparsegpt_mapped is False
    assert set().union(*block_files(adapter_for(model))) == {None}
