"""Progress events and cancellation, injected as callables.

The engine calls ``on_progress(event)`` with a dict and polls ``should_cancel()`` between
modules and blocks. ``Tracker`` turns "block i of n, stage s" into the overall fraction and
an ETA; ``console_reporter`` is the CLI's tqdm version. The worker passes a Redis one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

from worker.engine.errors import JobCancelled

ProgressCallback = Callable[[dict], None]
CancelCheck = Callable[[], bool]

# Rough shares of a job's time per stage, used to turn stage progress into one fraction.
# The zero-shot tasks (evaluating_tasks*) show as the stage "evaluating", as perplexity does.
STAGE_WEIGHTS = {
    "loading": 0.05,
    "calibrating": 0.05,
    "evaluating_dense": 0.15,
    "evaluating_tasks_dense": 0.15,
    "pruning": 0.55,
    "evaluating": 0.15,
    "evaluating_tasks": 0.15,
    "saving": 0.05,
}


# A stage that does what an earlier one did (the same windows through the same blocks; writing
# the weights as reading them): its measured time is the best guess for the later one.
TWINS = {"evaluating": "evaluating_dense", "evaluating_tasks": "evaluating_tasks_dense", "saving": "loading"}


def plain_message(
    message: str,
    *,
    stage: str | None,
    layer: int | None,
    layers: int | None,
    module: str | None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """An event's message without what the event's other fields already say, and with each path
    named as ``labels`` names it (RunOptions.labels: an upload as upload:3, the output as the
    archive's name): no "block 2 of 4" beside layer 2 of 4, no stage word repeated, no module
    named twice ("pruning self_attn.q_proj, self_attn.k_proj" beside module ...q_proj: "with
    self_attn.k_proj")."""
    for path, name in sorted((labels or {}).items(), key=lambda item: -len(item[0])):
        message = message.replace(path, name)
    if layer is not None and layers:
        message = re.sub(rf"\bblock {layer + 1} (?:of|/) ?{layers}\b", "", message)
    if stage and message.startswith(stage + " "):
        message = message[len(stage) + 1 :]
    if module:
        names = [n.strip() for n in message.split(",")]
        if names and all(n and " " not in n for n in names):  # a list of module names
            others = [n for n in names if not module.endswith("." + n) and n != module]
            message = f"with {', '.join(others)}" if others else ""
    return re.sub(r"\s{2,}", " ", message).strip(" :,-")


class Tracker:
    def __init__(
        self,
        on_progress: ProgressCallback | None,
        should_cancel: CancelCheck | None,
        stages: list[str],
        labels: Mapping[str, str] | None = None,
    ):
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        self.labels = dict(labels or {})  # path -> the name its events give it (RunOptions.labels)
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.share = {s: STAGE_WEIGHTS[s] / total for s in stages}
        self.start = time.perf_counter()
        self.stage_start = self.start
        self.stage: str | None = None
        self.done = 0.0  # fraction of the job in the stages already finished
        self.order = list(stages)
        self.took: dict[str, float] = {}  # seconds of each finished stage
        self.first: tuple[float, float] | None = None  # (stage fraction, time) of the stage's first report

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled("cancelled on request")

    def begin(self, stage: str, message: str = "") -> None:
        now = time.perf_counter()
        if self.stage is not None:
            self.done += self.share.get(self.stage, 0.0)
            self.took[self.stage] = self.took.get(self.stage, 0.0) + now - self.stage_start
        self.stage = stage
        self.stage_start = now
        self.first = None  # set by the stage's own first report (it may start past 0: a layer selection)
        self.emit(0.0, message=message, _opening=True)

    def eta(self, stage_fraction: float, now: float) -> float | None:
        """Seconds left, from what was measured: the current stage at its own pace so far (blocks
        done per second), a later stage as long as its measured twin took (the pruned model's
        evaluation as the dense one's), else in proportion to its weight at the current pace.
        None until the current stage has moved (its first block is not done yet)."""
        if self.first is None:
            self.first = (stage_fraction, now)
            return None
        f0, t0 = self.first
        share = self.share.get(self.stage, 0.0)
        if stage_fraction <= f0 or now <= t0 or share <= 0:
            return None
        per_stage = (now - t0) / (stage_fraction - f0)  # seconds the whole stage takes at this pace
        left = per_stage * (1 - stage_fraction)
        later = self.order[self.order.index(self.stage) + 1 :] if self.stage in self.order else []
        for stage in later:
            twin = TWINS.get(stage)
            left += self.took[twin] if twin in self.took else per_stage * self.share[stage] / share
        return left

    def emit(
        self,
        stage_fraction: float,
        *,
        layer: int | None = None,
        layers: int | None = None,
        module: str | None = None,
        message: str = "",
        _opening: bool = False,
    ) -> None:
        """Report progress inside the current stage (0..1); checks for cancellation first."""
        self.check_cancel()
        if self.on_progress is None:
            return
        now = time.perf_counter()
        fraction = min(1.0, self.done + self.share.get(self.stage, 0.0) * stage_fraction)
        elapsed = now - self.start
        eta = None if _opening else self.eta(stage_fraction, now)
        public_stage = "evaluating" if self.stage and self.stage.startswith("evaluating") else self.stage
        self.on_progress(
            {
                "stage": public_stage,
                "layer": layer,
                "layers": layers,
                "module": module,
                "fraction": round(fraction, 4),
                "eta_s": None if eta is None else round(eta, 1),
                "elapsed_s": round(elapsed, 2),
                "message": plain_message(
                    message, stage=public_stage, layer=layer, layers=layers, module=module, labels=self.labels
                ),
            }
        )


def console_reporter(stream=None) -> tuple[ProgressCallback, Callable[..., None]]:
    """A tqdm bar for the CLI: (on_progress, close); ``close(ok=False)`` wipes it, so an error is
    the only line left. When stderr is not a terminal (a file, a CI log) there is no bar: a line
    per stage and per block instead (``line_reporter``), so a log never stays silent for minutes."""
    import sys

    stream = stream if stream is not None else sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return line_reporter(stream)
    from tqdm import tqdm

    bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", file=stream)

    def on_progress(event: dict) -> None:
        bar.n = int(event["fraction"] * 1000)
        where = f"block {event['layer'] + 1}/{event['layers']}" if event.get("layer") is not None else ""
        bar.set_description(event["stage"])
        bar.set_postfix_str(" ".join(x for x in (where, event.get("module") or "", event.get("message") or "") if x))
        bar.refresh()

    def close(ok: bool = True) -> None:
        if not ok:
            bar.leave = False
        bar.close()

    return on_progress, close


def line_reporter(stream) -> tuple[ProgressCallback, Callable[..., None]]:
    """Progress as plain lines for a log: one when the stage changes and one per block, with the
    elapsed time and the ETA ("pruning  block 3/30  12.4 s elapsed, about 1 min 40 s left")."""
    seen: set[tuple] = set()

    def on_progress(event: dict) -> None:
        layer = event.get("layer")
        key = (event["stage"], layer)
        if key in seen:
            return
        seen.add(key)
        where = f"block {layer + 1}/{event['layers']}" if layer is not None and event.get("layers") else ""
        eta = event.get("eta_s")
        times = f"{event.get('elapsed_s', 0):.1f} s elapsed" + (f", about {_duration(eta)} left" if eta else "")
        text = "  ".join(x for x in (f"{event['stage']:<11}", where, times) if x)
        print(text, file=stream, flush=True)

    def close(ok: bool = True) -> None:
        stream.flush()

    return on_progress, close


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
