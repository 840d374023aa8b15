"""Loading a causal LM (hub id, local directory or GGUF file) and saving the pruned one.

The pruned model is saved as a DENSE safetensors checkpoint whose pruned weights are zeros:
current serving stacks (vLLM, llm-compressor) no longer load sparse checkpoints, so this is
what every tool reads. The model card says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from worker.engine.card import model_card
from worker.engine.contract import hub
from worker.engine.contract.spec import stored_dtype, working_dtype
from worker.engine.errors import InvalidJob, ModelNotFound
from worker.engine.offload import file_backed

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidJob(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidJob("device cuda was asked for, but no CUDA GPU is available here")
    if device.type not in ("cpu", "cuda"):
        raise InvalidJob(f"device {name!r} is not supported; use cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device, stored: str | None = None) -> torch.dtype:
    """The working dtype (worker.engine.contract.spec.working_dtype): 'auto' is the checkpoint's ``stored``
    float16/bfloat16 on CUDA, else fp16 (as the reference); fp32 on the CPU."""
    if name == "auto":
        return DTYPES[working_dtype("auto", device.type, stored)]
    if name not in DTYPES:
        raise InvalidJob(f"unknown dtype {name!r}; use auto, float16, bfloat16 or float32")
    return DTYPES[name]


def _gguf_file(directory: Path) -> str | None:
    """The one .gguf file of a directory that has no config.json, if that is what it holds."""
    if (directory / "config.json").exists():
        return None
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if len(ggufs) > 1:
        raise InvalidJob(f"{directory} holds several .gguf files ({', '.join(ggufs)}): name one")
    return ggufs[0] if ggufs else None


def _explain_load_error(model: str, exc: Exception) -> ModelNotFound:
    text = str(exc)
    name = type(exc).__name__
    lowered = text.lower()
    # Not any "gated": the Hub's 404 help says "a private or gated repo" for every missing id.
    if "Gated" in name or "access a gated repo" in lowered or "cannot access gated repo" in lowered:
        return ModelNotFound(f"model {model!r} is gated: accept its licence on the Hub and set HF_TOKEN")
    if "RepositoryNotFound" in name or "is not a local folder and is not a valid model identifier" in text:
        return ModelNotFound(f"model {model!r} was not found (neither a local directory nor a Hub model id)")
    if "RevisionNotFound" in name:
        return ModelNotFound(f"model {model!r}: revision not found")
    first_line = text.strip().splitlines()[0] if text.strip() else name
    return ModelNotFound(f"model {model!r} could not be loaded: {first_line}")


def check_files_inside(path: Path, allowed_roots: Sequence[str | Path]) -> None:
    """Raise InvalidJob naming the first file the loader could read under ``path`` (a directory,
    links followed, or one GGUF file) whose real path is outside every allowed root: a link inside
    an allowed model directory may point anywhere (``chat_template.jinja -> /proc/self/environ``)."""
    roots = [Path(root).resolve() for root in allowed_roots]
    for entry in [path, *_entries(path)]:
        try:
            real = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            real = None
        if real is None or not any(real == root or real.is_relative_to(root) for root in roots):
            shown = entry.name if entry == path else str(entry.relative_to(path))
            raise InvalidJob(
                f"model file {shown!r} does not resolve inside the allowed directories; "
                "every file of a local model must be inside them"
            )


def _entries(directory: Path):
    """Every entry below ``directory``, linked directories followed (each real directory once)."""
    seen: set[Path] = set()
    for current, dirs, files in os.walk(directory, followlinks=True):
        real = Path(current).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield from (Path(current) / name for name in (*dirs, *files))


def load_model(
    model: str,
    *,
    dtype: torch.dtype | None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
):
    """(model on the CPU in eval mode, tokenizer). ``dtype`` None: dtype auto on a GPU, the
    checkpoint's own float16/bfloat16 (else float16). The model gets ``sparsegpt_dtype`` (the
    dtype it was loaded in), ``sparsegpt_stored`` (the one its config says its files hold, a
    name, or None) and ``sparsegpt_mapped``: True when its weights stay memory-mapped
    from the checkpoint's files (not GGUF, loaded in the dtype they are stored in, and every 2-D+
    weight found in a file mapping of this process where /proc tells), False when transformers
    converted them into host memory (or it cannot be told). ``allowed_roots``: a local model's
    every file must resolve inside one of them (checked here, right before the load); None: any."""
    # Long on purpose: the loader's cases (local directory, Hub id, GGUF, dtype, memory-mapping check) in the one order
    # they are decided.
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the engine reports its own progress
    hub.one_copy_of_hub_logs()
    path = Path(model).expanduser()
    kwargs: dict = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "token": token or os.environ.get("HF_TOKEN"),
    }
    # A path is absolute or starts with ./ ../ ~; anything else is a Hub id and never read from
    # the disk (from_pretrained would read ./org/name before asking the Hub).
    local = path.is_absolute() or model.startswith(("./", "../", "~"))
    if local and path.suffix == ".gguf" and path.is_file():
        model_source, kwargs["gguf_file"] = str(path.parent), path.name
    elif local and path.is_dir():
        model_source = str(path)
        gguf = _gguf_file(path)
        if gguf:
            kwargs["gguf_file"] = gguf
    elif local or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelNotFound(f"model directory {model!r} does not exist")
    elif os.path.lexists(model):
        raise InvalidJob(
            f"{model!r} is read as a Hub id, but the working directory holds an entry of that name; "
            f"name the local model as ./{model} or by its absolute path"
        )
    else:
        model_source = model
        _check_hub(model, revision, kwargs)
    if local and allowed_roots is not None:
        check_files_inside(path.resolve(), allowed_roots)
    try:
        stored = None
        if "gguf_file" not in kwargs:  # GGUF weights are dequantized: never mapped, stored as nothing we load
            stored = stored_dtype(transformers.AutoConfig.from_pretrained(model_source, **kwargs).to_dict())
        if dtype is None:
            dtype = resolve_dtype("auto", torch.device("cuda"), stored)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_source, **kwargs)
        lm = transformers.AutoModelForCausalLM.from_pretrained(model_source, dtype=dtype, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise InvalidJob(f"model {model!r} needs trust_remote_code, which this run does not allow") from None
        raise _explain_load_error(model, exc) from None
    except OSError as exc:
        raise _explain_load_error(model, exc) from None
    if "gguf_file" in kwargs:
        # GGUF weights arrive dequantized; the config's quantization note no longer applies.
        lm.config.quantization_config = None
        if hasattr(lm.config, "__dict__"):
            lm.config.__dict__.pop("quantization_config", None)
    lm.eval()
    lm.sparsegpt_dtype, lm.sparsegpt_stored = dtype, stored
    # What the estimate trusts is checked, not inferred alone: a config whose dtype is not its files'
    # leaves converted (anonymous) weights behind.
    lm.sparsegpt_mapped = (
        stored is not None
        and DTYPES[stored] == dtype
        and file_backed(p for p in lm.parameters() if p.dim() >= 2) is not False
    )
    lm.sparsegpt_loaded_config = lm.config.to_dict()  # what save_pruned restores
    lm.config.use_cache = False  # the engine's own forwards keep no cache
    return lm, tokenizer


def restore_config(model) -> None:
    """Put back every config field the engine changed for its run (use_cache, ...), so the saved
    config.json is the loaded model's (save for what the pruning made true: dtype, GGUF's
    dequantization)."""
    loaded = getattr(model, "sparsegpt_loaded_config", None)
    if not loaded:
        return
    now = model.config.to_dict()
    for key, value in loaded.items():
        current = getattr(model.config, key, None)
        if now.get(key) != value and not hasattr(current, "to_dict"):  # sub-configs stay objects
            setattr(model.config, key, value)


def _check_hub(model: str, revision: str | None, kwargs: dict) -> None:
    """Fail in seconds, with what to do, when a Hub model cannot be fetched (no network, offline
    mode); a model in the local cache is then read from it (``local_files_only``)."""
    if hub.offline():
        if not hub.cached_model(model, revision):
            raise ModelNotFound(
                f"model {model!r} is not in this machine's Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it beforehand (`hf download {model}`, same HF_HOME) or use a local model directory"
            )
        return
    why = hub.unreachable(model, revision)
    if why is not None:
        if not hub.cached_model(model, revision):
            raise ModelNotFound(hub.what_to_do("model", model, why))
        kwargs["local_files_only"] = True


def context_length(model, tokenizer) -> int | None:
    """The longest sequence the model was built for, or None when it has no fixed limit."""
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give every file under ``directory`` the mode the umask allows (0644 under the usual 022).

    Some writers (safetensors through a temporary file) create 0600 files, which teammates of a
    shared server could not read once the directory is published.
    """
    mask = current_umask()
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_pruned(
    model,
    tokenizer,
    output: str | Path,
    finish_report: Callable[[dict[str, Path]], dict],
    writers: dict[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Write the HF directory (safetensors, config, tokenizer, README card, report) atomically.

    ``writers``: the model's formats by name, each writing its weights and config into a directory
    (None: ``model.save_pretrained``, the dense one). One format is written into ``output`` itself;
    several each into ``output/<name>`` (``compressed-tensors``, ``dense``), every one a whole
    directory with tokenizer, card and report. They are written in the order given.
    ``finish_report(directories)`` is called once every format's weights and tokenizer are written
    (with each format's directory), so the report and the card carry the real save time and sizes.
    The directory is written next to ``output`` and renamed into place, so an interrupted save
    never leaves a partial directory at ``output``.
    """
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise InvalidJob(f"output directory {str(output)!r} exists and is not empty")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would outlive the rename: follow the umask
    writers = writers or {"dense": lambda d: model.save_pretrained(d, safe_serialization=True)}
    dirs = {name: staging / name if len(writers) > 1 else staging for name in writers}
    try:
        restore_config(model)
        for name, write in writers.items():
            dirs[name].mkdir(exist_ok=True)
            write(dirs[name])
            tokenizer.save_pretrained(dirs[name])
        report = finish_report(dirs)
        for directory in dirs.values():
            (directory / "README.md").write_text(model_card(report), encoding="utf-8")
            (directory / "sparsegpt_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        follow_umask(staging)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def directory_bytes(directory: Path) -> int:
    """The bytes of the files in ``directory`` (not below): one saved format's size."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())
