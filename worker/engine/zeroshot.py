"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

``ZeroShot(names, limit=..., batch_size=..., task_dirs=...)`` checks the task names against the
harness's index (its own tasks and the YAML tasks in ``task_dirs``) and loads their data when
``prepare()`` is called, before anything is pruned, so an unknown name or data that cannot be
read fails the job at once. ``evaluate(...)`` then runs the tasks on the model as it is (dense
or pruned) with the harness's own Hugging Face wrapper (``lm_eval.models.huggingface.HFLM``
given the in-memory model and tokenizer: nothing is loaded again from disk), reporting progress
and polling cancellation per batch.

The model lives on the CPU between the engine's steps. For the evaluation it goes to the
device whole when it fits in the free memory there, else its decoder blocks are brought in one
at a time for their own forward (slower, but any size works); afterwards it is back where it was.

lm-eval is an optional dependency (``pip install 'sparsegpt-service[eval]'``), imported only
when tasks are asked for.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.engine.architectures import Adapter
from worker.engine.block_inputs import release_memory
from worker.engine.errors import DataError, InvalidJob
from worker.engine.progress import Tracker

log = logging.getLogger(__name__)

BOOTSTRAP_ITERS = 1000  # stderr of metrics without a closed form (acc's is closed-form)
EMIT_EVERY_S = 0.5  # progress events at most this often (cancellation is checked every batch)
HEADROOM_BYTES = 2 * 2**30  # free device memory kept for activations and logits beyond the weights


def _harness():
    try:
        import lm_eval
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise InvalidJob(
            "zero-shot tasks (evaluation.tasks) need lm-evaluation-harness where the job runs: "
            f"pip install 'sparsegpt-service[eval]' ({exc})"
        ) from None
    return lm_eval, evaluate, HFLM, TaskManager


class ZeroShot:
    """The zero-shot tasks of one job: checked and loaded once, evaluated dense and pruned."""

    def __init__(self, names: list[str], *, limit: int | None, batch_size: int, task_dirs: tuple[str, ...] = ()):
        self.names, self.limit, self.batch_size = list(names), limit, batch_size
        self.task_dirs = tuple(task_dirs)
        self.tasks: dict | None = None
        self.results: dict[str, dict[str, dict[str, float]]] = {}  # "dense"/"pruned" -> task -> metric -> value
        self.examples: dict[str, int] = {}
        self.version: str | None = None
        self.placement: str | None = None  # how the last evaluation ran the model (placed)

    def prepare(self) -> None:
        """Check the names and load the tasks' data (InvalidJob / DataError naming the task)."""
        if not self.names or self.tasks is not None:
            return
        lm_eval, _, _, TaskManager = _harness()  # noqa: N806
        self.version = getattr(lm_eval, "__version__", None)
        missing = [d for d in self.task_dirs if not Path(d).is_dir()]
        if missing:
            raise InvalidJob(
                f"evaluation.tasks: the task directory {missing[0]} does not exist (--eval-include, "
                "SPARSEGPT_EVAL_INCLUDE_DIRS)"
            )
        manager = TaskManager(include_path=list(self.task_dirs) or None)
        known = set(manager.all_tasks)
        unknown = [name for name in self.names if name not in known]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, manager.all_tasks, n=3)
                hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            where = " or in the task directories " + ", ".join(self.task_dirs) if self.task_dirs else ""
            raise InvalidJob(
                f"evaluation.tasks: unknown lm-eval task {'; '.join(hints)}: not one of lm-eval "
                f"{self.version or ''}'s tasks{where} (`lm-eval ls tasks` lists them)"
            )
        unsafe = _unsafe_tasks(manager, self.names)
        if unsafe:  # before ``load``, which imports the task's code (humaneval: a Hub metric's)
            raise InvalidJob(
                f"evaluation.tasks: {', '.join(unsafe)} run the model's generated code, which the engine never does"
            )
        try:
            self.tasks = manager.load(self.names)
        except Exception as exc:  # the harness and `datasets` raise many kinds; the job needs one line
            raise DataError(
                f"evaluation.tasks: the data of {', '.join(self.names)} could not be loaded "
                f"({type(exc).__name__}: {_first_line(exc)}); tasks read their data through "
                "`datasets`, from the Hub or its cache (HF_HOME)"
            ) from exc
        unsafe = [name for name, task in self.tasks["tasks"].items() if getattr(task, "UNSAFE_CODE", False)]
        if unsafe:
            raise InvalidJob(
                f"evaluation.tasks: {', '.join(unsafe)} run the model's generated code, which the engine never does"
            )

    def evaluate(
        self,
        key: str,
        model: nn.Module,
        tokenizer: Any,
        adapter: Adapter,
        *,
        device: torch.device,
        tracker: Tracker,
        label: str,
        how: str = "auto",
    ) -> dict[str, dict[str, float]]:
        """Run the tasks on ``model`` as it is now; kept under ``key`` ("dense" or "pruned");
        ``how``: where the model runs (``placed``)."""
        self.prepare()
        _, evaluate, HFLM, _ = _harness()  # noqa: N806
        tracker.emit(0.0, message=f"{label} zero-shot {', '.join(self.names)}")
        with _quiet_harness(), placed(model, adapter, device, how=how) as self.placement:
            lm = _tracked(HFLM)(
                pretrained=model,
                tokenizer=copy.deepcopy(tokenizer),
                batch_size=self.batch_size,
                softmax_dtype=torch.float32,
                tracker=tracker,
                label=f"{label} zero-shot",
            )
            lm._device = device  # where the inputs go: the embeddings are there in either placement
            out = evaluate(lm, self.tasks, limit=self.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
        self.results[key] = metrics(out["results"])
        self.examples = {name: int(n.get("effective", 0)) for name, n in (out.get("n-samples") or {}).items()}
        return self.results[key]

    def report(self) -> dict[str, Any] | None:
        if not self.names:
            return None
        return {
            "tasks": self.names,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "lm_eval": self.version,
            "placement": self.placement,
            "examples": self.examples,
            "dense": self.results.get("dense", {}),
            "pruned": self.results.get("pruned", {}),
        }


def _unsafe_tasks(manager: Any, names: list[str]) -> list[str]:
    """The tasks among ``names`` (groups and tags expanded) whose config says ``unsafe_code``,
    read from the harness's task index (its YAML, includes resolved): no task code imported."""
    index = getattr(manager, "task_index", {})
    unsafe: list[str] = []
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        entry = index.get(name) if isinstance(name, str) else None
        if entry is None or name in seen:
            continue
        seen.add(name)
        cfg = getattr(entry, "cfg", None) or {}
        if cfg.get("unsafe_code"):
            unsafe.append(name)
        kind = getattr(getattr(entry, "kind", None), "name", "")
        if kind == "GROUP":
            todo += [t.get("task") if isinstance(t, dict) else t for t in _as_list(cfg.get("task"))]
        elif kind == "TAG":
            todo += [other for other, e in index.items() if name in (getattr(e, "tags", None) or ())]
    return sorted(unsafe)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The harness's ``results`` as task -> metric -> value: ``"acc,none"`` becomes ``acc``, a
    filtered metric keeps its filter (``exact_match,strict-match``); non-numbers ("N/A") are dropped."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if math.isfinite(value):
                row[metric if filt == "none" else key] = float(value)
        out[task] = row
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


@contextmanager
def _quiet_harness() -> Iterator[None]:
    """The harness logs every step at INFO, warns about an in-memory model (what we mean) and
    draws a bar per task while it builds the requests; the job's progress says all that."""
    from lm_eval.api import task as task_module

    logger = logging.getLogger("lm_eval")
    level, bar = logger.level, getattr(task_module, "tqdm", None)
    logger.setLevel(logging.ERROR)
    if bar is not None:
        task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is not None:
            task_module.tqdm = bar


def _tracked(HFLM):  # noqa: N803 - the harness's class, imported when first needed
    """HFLM that reports progress per batch and lets a cancel stop it between batches."""

    class TrackedLM(HFLM):
        def __init__(self, *args, tracker: Tracker, label: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._tracker, self._label = tracker, label
            self._total = self._done = 0
            self._fraction, self._emitted = 0.0, 0.0

        def _begin(self, requests: list) -> None:
            self._total += len(requests)

        def _step(self, rows: int) -> None:
            self._done += rows
            self._fraction = max(self._fraction, min(0.99, self._done / max(1, self._total)))
            now = time.monotonic()
            if now - self._emitted < EMIT_EVERY_S:
                self._tracker.check_cancel()
                return
            self._emitted = now
            self._tracker.emit(
                self._fraction, message=f"{self._label}: {min(self._done, self._total)} of {self._total} requests"
            )

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._begin(requests)
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._begin(requests)
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._begin(requests)
            return super().generate_until(requests, disable_tqdm=True)

        def _model_call(self, inps, attn_mask=None, labels=None):
            self._step(int(inps.shape[0]))
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            self._step(int(context.shape[0]))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    return TrackedLM


# --- where the model is while the harness runs it ------------------------------------------------


def _weight_bytes(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _to_device(modules: list[nn.Module], device: torch.device, *, recurse: bool = True) -> list[tuple]:
    """Copies of the modules' parameters and buffers on ``device`` (their own only, without
    ``recurse``); returns what ``_give_back`` needs to point them at their host tensors again. The
    host tensors are kept, not copied back: memory-mapped weights (worker.engine.offload) stay file
    pages. A tensor shared by two modules (tied embeddings) is moved once."""
    records, host_of = [], {}
    for module in modules:
        for m in module.modules() if recurse else (module,):
            for kind, table in (("p", m._parameters), ("b", m._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in host_of:
                        host_of[id(t)] = t.data if kind == "p" else t
                        if kind == "p":
                            t.data = t.data.to(device)
                        else:
                            table[name] = t.to(device)
                    records.append((table, kind, name, host_of[id(t)]))
    return records


def _give_back(records: list[tuple]) -> None:
    for table, kind, name, host in records:
        if kind == "p":
            table[name].data = host
        else:
            table[name] = host


@contextmanager
def placed(model: nn.Module, adapter: Adapter, device: torch.device, how: str = "auto") -> Iterator[str]:
    """The model runnable on ``device`` for the block of the ``with``; yields how: "here" (it
    already is), "whole" (moved there) or "streamed" (all but the decoder blocks moved there,
    each block brought in for its own forward and sent back after it). ``how="auto"`` picks:
    here, else whole when the weights and some headroom fit in the device's free memory, else
    streamed; "whole" or "streamed" forces one."""
    home = next(model.parameters()).device
    if how == "auto" and (home == device or device.type == "cpu" and home.type == "cpu"):
        yield "here"
        return
    if how == "auto":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        how = "whole" if _weight_bytes([model]) + HEADROOM_BYTES <= free else "streamed"
    if how == "whole":
        records = _to_device([model], device)
        try:
            yield "whole"
        finally:
            _give_back(records)
            release_memory(device)
        return
    in_blocks = {id(m) for block in adapter.blocks for m in block.modules()}
    on_device: dict[int, list[tuple]] = {}  # id(block) -> its records while it is on the device

    def bring(module: nn.Module, args: tuple) -> None:  # a hook's None keeps the block's inputs / output
        on_device[id(module)] = _to_device([module], device)

    def send_back(module: nn.Module, args: tuple, output: Any) -> None:
        _give_back(on_device.pop(id(module), []))

    hooks = []
    for block in adapter.blocks:
        hooks += [block.register_forward_pre_hook(bring), block.register_forward_hook(send_back)]
    outside = _to_device([m for m in model.modules() if id(m) not in in_blocks], device, recurse=False)
    try:
        yield "streamed"
    finally:
        for hook in hooks:
            hook.remove()
        for records in on_device.values():  # a forward that raised left its block there
            _give_back(records)
        _give_back(outside)
        release_memory(device)
