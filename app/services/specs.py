"""The job spec checked against the server: its caps, allowed directories and uploads (the spec
itself, ``worker.engine.contract.spec.JobSpec``, checks everything that needs no server state)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app import crud
from app.config import Settings
from app.model_links import escaped_file
from app.paths import PathNotAllowed, resolve_allowed
from app.services.model_config import hub_config, local_config, nm_width_message
from app.services.routing import choose_queue
from worker.engine.contract.estimate import Estimate, JobSize, estimate, estimate_method
from worker.engine.contract.hub import dataset_unavailable, model_unavailable
from worker.engine.contract.spec import JobSpec, stored_dtype, working_dtype
from worker.engine.contract.spec_quant import group_size_message
from worker.engine.contract.spec_sections import BUILTIN_DATASETS, upload_id

DEFAULT_SEQLEN = 2048  # what the engine uses when the spec has none (or the model's context, if shorter)


class SpecError(ValueError):
    """Holds FastAPI-style error entries; the API answers 422 with them."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def _error(loc: tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg}


def _dataset(value: str, loc: tuple, settings: Settings, session: Session, errors: list) -> str:
    if value in BUILTIN_DATASETS:
        unavailable = dataset_unavailable(value)
        if unavailable:
            errors.append(_error(loc, unavailable))
        return value
    set_id = upload_id(value)
    if set_id is not None:
        if crud.get_calibration_set(session, set_id) is None:
            errors.append(_error(loc, f"{value}: no such calibration set (see GET /api/v1/calibration-sets)"))
        return value
    try:
        return str(resolve_allowed(value, settings.allowed_dirs, kind="file"))
    except PathNotAllowed as err:
        errors.append(_error(loc, str(err)))
        return value


WEIGHT_FILES = ("*.safetensors", "*.bin")  # what from_pretrained loads (sharded: their index names them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def model_files_problem(directory: Path) -> str | None:
    """What a local model directory lacks to be loaded (worker.engine.checkpoint.load_model): a
    config.json with weights and a tokenizer, or one .gguf file (which holds all three); None if
    nothing. Checked at submit, so a directory that cannot load is not queued for minutes first."""
    try:
        names = {p.name for p in directory.iterdir()}
    except OSError as err:
        return f"model directory {directory.name!r} cannot be read ({err.strerror or type(err).__name__})"
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if "config.json" not in names:
        if len(ggufs) == 1:
            return None
        if ggufs:
            return f"model directory {directory.name!r} holds several .gguf files ({', '.join(ggufs)}): keep one"
        return (
            f"model directory {directory.name!r} holds no loadable model: config.json is missing (a "
            "Hugging Face model saved with save_pretrained has config.json, weights and tokenizer files; "
            "or one .gguf file)"
        )
    lacking = []
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_FILES):
        lacking.append("weights (*.safetensors or *.bin)")
    if not names.intersection(TOKENIZER_FILES):
        lacking.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if lacking:
        return f"model directory {directory.name!r} has config.json but no {' and no '.join(lacking)}"
    return None


@dataclass(frozen=True)
class Checked:
    data: dict[str, Any]  # the spec as stored: local paths resolved
    queue: str  # where it fits (app/services/routing.py)


def check_spec(spec: JobSpec, settings: Settings, session: Session, *, whole_nm: bool = False) -> Checked:
    """The spec as stored and its queue. Raises SpecError listing every problem. ``whole_nm``
    (a plan's jobs): an N:M pattern whose M does not divide a layer's input width is refused too
    (a single job leaves that layer's last columns dense, and says so in its report)."""
    errors: list[dict[str, Any]] = []
    data = spec.model_dump(mode="json")
    if spec.trust_remote_code and not settings.allow_trust_remote_code:
        errors.append(
            _error(
                ("trust_remote_code",),
                "trust_remote_code is refused by this server (it runs the model repository's "
                "Python code on the workers; an admin may set SPARSEGPT_ALLOW_TRUST_REMOTE_CODE=true)",
            )
        )
    if spec.model.startswith("/"):
        try:
            data["model"] = str(resolve_allowed(spec.model, settings.allowed_dirs, kind="dir"))
        except PathNotAllowed as err:
            errors.append(_error(("model",), str(err)))
        else:
            directory = Path(data["model"])
            missing = model_files_problem(directory) or escaped_file(directory, settings.allowed_dirs)
            if missing:
                errors.append(_error(("model",), missing))
    else:
        unavailable = model_unavailable(spec.model, spec.revision)
        if unavailable:
            errors.append(_error(("model",), unavailable))
    cal = spec.calibration
    if cal.nsamples > settings.max_nsamples:
        errors.append(
            _error(
                ("calibration", "nsamples"),
                f"nsamples {_number(cal.nsamples)} is above this server's limit of {settings.max_nsamples}",
            )
        )
    if cal.seqlen is not None and cal.seqlen > settings.max_seqlen:
        errors.append(
            _error(
                ("calibration", "seqlen"),
                f"seqlen {_number(cal.seqlen)} is above this server's limit of {settings.max_seqlen}",
            )
        )
    _check_size(spec, settings, errors)
    data["calibration"]["dataset"] = _dataset(cal.dataset, ("calibration", "dataset"), settings, session, errors)
    sets = spec.evaluation.datasets
    if len(sets) > settings.max_eval_sets:
        errors.append(_error(("evaluation", "datasets"), f"at most {settings.max_eval_sets} evaluation sets"))
    data["evaluation"]["datasets"] = [
        _dataset(v, ("evaluation", "datasets", i), settings, session, errors) for i, v in enumerate(sets)
    ]
    if not errors:
        found = _check_memory(spec, data, settings, session, errors, whole_nm=whole_nm)
        if not errors:
            queue, refusal = choose_queue(settings, data["resources"], found)
            if refusal:
                errors.append(_error(("resources",), refusal))
    if errors:
        raise SpecError(errors)
    return Checked(data, queue)


def _number(value: int) -> str:
    """An integer as a person reads it; a huge one is not echoed in full."""
    text = f"{value:,}"
    return text if len(text) <= 30 else f"a {len(str(value))}-digit number"


def _check_size(spec: JobSpec, settings: Settings, errors: list) -> None:
    """Calibration tokens (nsamples x seqlen) and evaluation windows, against the server's caps."""
    cal = spec.calibration
    seqlen = cal.seqlen if cal.seqlen is not None else DEFAULT_SEQLEN
    tokens = cal.nsamples * seqlen
    if spec.reads_calibration and tokens > settings.max_calibration_tokens:
        errors.append(
            _error(
                ("calibration", "nsamples"),
                f"nsamples {_number(cal.nsamples)} x seqlen "
                f"{_number(seqlen)}{'' if cal.seqlen else ' (the default)'} = "
                f"{_number(tokens)} calibration tokens, above this server's limit of "
                f"{_number(settings.max_calibration_tokens)} (SPARSEGPT_MAX_CALIBRATION_TOKENS); lower nsamples or "
                "seqlen",
            )
        )
    windows = spec.evaluation.max_windows
    if windows is not None and windows > settings.max_eval_windows:
        errors.append(
            _error(
                ("evaluation", "max_windows"),
                f"evaluation.max_windows {_number(windows)} is above this server's limit of "
                f"{_number(settings.max_eval_windows)} windows per set (SPARSEGPT_MAX_EVAL_WINDOWS)",
            )
        )


def _text_bytes(name: str, stored: str, session: Session) -> int | None:
    """The size of an evaluation text (None for a built-in set)."""
    if name in BUILTIN_DATASETS:
        return None
    set_id = upload_id(name)
    if set_id is not None:
        row = crud.get_calibration_set(session, set_id)
        return int(row.size) if row is not None else 0
    try:
        return Path(stored).stat().st_size
    except OSError:
        return 0


def job_dtype(spec_dtype: str, worker_device: str, config: dict[str, Any] | None = None) -> tuple[str, str]:
    """(working dtype, device kind) as the API guesses the worker's (worker.engine.contract.spec.working_dtype:
    ``auto`` is the checkpoint's fp16/bf16 on CUDA, else fp16, and fp32 on the CPU); a worker
    device of ``auto`` is taken for a GPU (the smaller estimate: the worker checks again with what
    it has)."""
    device = "cpu" if worker_device == "cpu" else "cuda"
    return working_dtype(spec_dtype, device, stored_dtype(config or {})), device


def weights_mapped(model_dir: str | None, config: dict[str, Any], dtype: str) -> bool:
    """Whether the worker will keep the weights memory-mapped (worker.engine.checkpoint.load_model):
    loaded in the dtype the config says they are stored in, from safetensors (or PyTorch) files,
    which a local directory must hold (a Hub model's are taken to be there)."""
    if stored_dtype(config) != dtype:
        return False
    if model_dir is None:
        return True
    try:
        return any(p.suffix in (".safetensors", ".bin") for p in Path(model_dir).iterdir())
    except OSError:
        return False


def _check_group_size(spec: JobSpec, config: dict[str, Any], errors: list) -> None:
    """A quantization group size that does not divide every quantized Linear's input width (from the
    model's config.json), refused before queueing in the words the engine would use."""
    if spec.quantization is not None:
        problem = group_size_message(config, spec.quantization.group_size)
        if problem:
            errors.append(_error(("quantization", "group_size"), problem))


def _check_memory(
    spec: JobSpec, data: dict[str, Any], settings: Settings, session: Session, errors: list, *, whole_nm: bool = False
) -> Estimate | None:
    """The job's memory estimate (returned: the job is routed by it) against
    SPARSEGPT_MAX_JOB_MEMORY_GB, when the model's config can be read here: a local directory's
    config.json, or a Hub model's config.json alone (short timeout). When it cannot (offline,
    gated, GGUF), the worker checks before calibrating."""
    if spec.model.startswith("/"):
        config = local_config(data["model"])
    else:
        config = hub_config(spec.model, spec.revision)
    if config is None:
        return None
    _check_group_size(spec, config, errors)
    nm_problem = nm_width_message(config, spec.pattern) if whole_nm else None
    if nm_problem:
        errors.append(_error(("sparsity",), nm_problem))
    dtype, device = job_dtype(spec.dtype, settings.worker_device, config)
    names = spec.evaluation.datasets
    size = JobSize(
        method=estimate_method(spec.method, spec.sparsity_profile),
        nsamples=spec.calibration.nsamples,
        seqlen=spec.calibration.seqlen,
        dtype=dtype,
        device=device,
        max_windows=spec.evaluation.max_windows,
        mapped=weights_mapped(data["model"] if spec.model.startswith("/") else None, config, dtype),
        stored=stored_dtype(config),
        eval_sets=tuple((n, _text_bytes(n, s, session)) for n, s in zip(names, data["evaluation"]["datasets"])),
    )
    found = estimate(config, size)
    refusal = found.refusal(settings.max_job_memory_gb) if found is not None else None
    if refusal:
        errors.append(_error(found.field, refusal))
    return found
