"""Progress events and cancellation, injected as callables.

The engine calls ``on_progress(event)`` with a dict and polls ``should_cancel()`` between
modules and blocks. ``Tracker`` turns "block i of n, stage s" into the overall fraction and
an ETA; ``console_reporter`` is the CLI's tqdm version. The worker passes a Redis one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.engine.errors import JobCancelled

ProgressCallback = Callable[[dict], None]
CancelCheck = Callable[[], bool]

# Rough shares of a job's time per stage, used to turn stage progress into one fraction.
STAGE_WEIGHTS = {"loading": 0.05, "calibrating": 0.05, "evaluating_dense": 0.15, "pruning": 0.55,
                 "evaluating": 0.15, "saving": 0.05}


class Tracker:
    def __init__(self, on_progress: ProgressCallback | None, should_cancel: CancelCheck | None,
                 stages: list[str]):
        self.on_progress = on_progress
        self.should_cancel = should_cancel
        total = sum(STAGE_WEIGHTS[s] for s in stages)
        self.share = {s: STAGE_WEIGHTS[s] / total for s in stages}
        self.start = time.perf_counter()
        self.stage_start = self.start
        self.stage: str | None = None
        self.done = 0.0  # fraction of the job in the stages already finished

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled("cancelled on request")

    def begin(self, stage: str, message: str = "") -> None:
        if self.stage is not None:
            self.done += self.share.get(self.stage, 0.0)
        self.stage = stage
        self.stage_start = time.perf_counter()
        self.emit(0.0, message=message)

    def emit(self, stage_fraction: float, *, layer: int | None = None, layers: int | None = None,
             module: str | None = None, message: str = "") -> None:
        """Report progress inside the current stage (0..1); checks for cancellation first."""
        self.check_cancel()
        if self.on_progress is None:
            return
        now = time.perf_counter()
        fraction = min(1.0, self.done + self.share.get(self.stage, 0.0) * stage_fraction)
        elapsed = now - self.start
        eta = elapsed * (1 - fraction) / fraction if fraction >= 0.02 else None
        public_stage = "evaluating" if self.stage == "evaluating_dense" else self.stage
        self.on_progress({
            "stage": public_stage, "layer": layer, "layers": layers, "module": module,
            "fraction": round(fraction, 4), "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(elapsed, 2), "message": message,
        })


def console_reporter() -> tuple[ProgressCallback, Callable[..., None]]:
    """A tqdm bar for the CLI: (on_progress, close). No bar when stderr is not a terminal (a log
    gets no bar fragments); ``close(ok=False)`` wipes it, so an error is the only line left."""
    from tqdm import tqdm

    bar = tqdm(total=1000, unit="", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}", disable=None)

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
