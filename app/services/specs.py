"""The job spec checked against the server: its caps, allowed directories and uploads (the spec
itself, ``worker.engine.spec.JobSpec``, checks everything that needs no server state)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import crud
from app.config import Settings
from app.paths import PathNotAllowed, resolve_allowed
from worker.engine.spec import BUILTIN_DATASETS, JobSpec, upload_id


class SpecError(ValueError):
    """Holds FastAPI-style error entries; the API answers 422 with them."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def _error(loc: tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": ["body", *loc], "msg": msg}


def _dataset(value: str, loc: tuple, settings: Settings, session: Session, errors: list) -> str:
    if value in BUILTIN_DATASETS:
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


def check_spec(spec: JobSpec, settings: Settings, session: Session) -> dict[str, Any]:
    """The spec as stored: local paths resolved. Raises SpecError listing every problem."""
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
    cal = spec.calibration
    if cal.nsamples > settings.max_nsamples:
        errors.append(
            _error(("calibration", "nsamples"), f"nsamples {cal.nsamples} is above this server's limit of {settings.max_nsamples}")
        )
    if cal.seqlen is not None and cal.seqlen > settings.max_seqlen:
        errors.append(
            _error(("calibration", "seqlen"), f"seqlen {cal.seqlen} is above this server's limit of {settings.max_seqlen}")
        )
    data["calibration"]["dataset"] = _dataset(cal.dataset, ("calibration", "dataset"), settings, session, errors)
    sets = spec.evaluation.datasets
    if len(sets) > settings.max_eval_sets:
        errors.append(_error(("evaluation", "datasets"), f"at most {settings.max_eval_sets} evaluation sets"))
    data["evaluation"]["datasets"] = [
        _dataset(v, ("evaluation", "datasets", i), settings, session, errors) for i, v in enumerate(sets)
    ]
    if errors:
        raise SpecError(errors)
    return data
