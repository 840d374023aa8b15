"""``sparsegpt prune MODEL``: the engine alone, from the command line.

The job's flags are built from the job spec (``worker.engine.contract.spec``): each spec field with a CLI
flag becomes one, with the spec's default and description, and the arguments are checked by the
spec itself, before torch is imported, so a bad argument is refused at once with the same reason
the API and the form give. Bad input ends with one line on stderr and exit code 2; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.engine.contract.spec import METHODS, JobSpec, set_path
from worker.engine.contract.spec_fields import Leaf, error_path, leaf_fields, plain_message
from worker.engine.contract.spec_quant import FORMATS
from worker.engine.contract.spec_sections import BUILTIN_DATASETS
from worker.engine.report_text import summary

EXIT_USAGE = 2
PROG = "sparsegpt prune"
_SPEC = "spec:"  # argparse dest prefix of the flags that are spec fields


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as argparse does, without the usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_spec_flag(p: argparse.ArgumentParser, leaf: Leaf) -> None:
    """One flag for one spec field; unset flags are left out, so the spec's defaults apply."""
    text = leaf.info.description or ""
    if leaf.choices:
        text += f" ({', '.join(leaf.choices)})"
    dest = _SPEC + leaf.dotted
    if leaf.kind == "bool":
        action = "store_false" if leaf.ui.cli_negate else "store_true"
        p.add_argument(
            leaf.ui.cli,
            dest=dest,
            action=action,
            default=argparse.SUPPRESS,
            help=("do not " + text) if leaf.ui.cli_negate else text,
        )
        return
    if leaf.default not in (None, [], ""):
        text += f" (default {leaf.default})"
    if leaf.kind == "list":
        p.add_argument(
            leaf.ui.cli,
            dest=dest,
            action="append",
            metavar=leaf.ui.metavar or "GLOB",
            default=argparse.SUPPRESS,
            help=text + "; repeatable",
        )
        return
    default = argparse.SUPPRESS
    if leaf.required and leaf.ui.suggested is not None:
        default = leaf.ui.suggested
        text += f" (default {default})"
    metavar = leaf.path[-1].rstrip("_").upper()
    if leaf.path == ("sparsity_profile",):  # the CLI also reads the per-block list from a file
        metavar, text = "uniform|owl|S0,S1,...|@FILE.json", text + "; @FILE.json: a JSON list in a file"
    p.add_argument(leaf.ui.cli, dest=dest, default=default, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=f"Prune a causal LM one-shot ({' / '.join(METHODS)}) and report its perplexity.")
    p.add_argument(
        "model",
        help="Hugging Face model id, local model directory, or .gguf file (a path that exists "
        "here is read from the disk; the server reads only absolute paths under its "
        "allowed directories, and never looks for a Hub id on its disk)",
    )
    for leaf in leaf_fields():
        if leaf.ui.cli:
            _add_spec_flag(p, leaf)
    p.add_argument(
        "--eval",
        dest="eval_sets",
        action="append",
        metavar="NAME|FILE",
        help="perplexity set (wikitext2, c4, ptb or a file); repeatable; default wikitext2",
    )
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument(
        "--eval-include",
        dest="task_dirs",
        action="append",
        metavar="DIR",
        default=[],
        help="a directory of lm-eval task YAML files that --eval-tasks may name; repeatable",
    )
    p.add_argument("--batch-size", type=int, help="sequences per block forward (default ~16k tokens)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", "-o", help="directory to save the pruned model in")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        metavar="FORMAT",
        help="what --output holds: compressed-tensors (the packed quantized checkpoint; the default "
        "with --quantize) or dense (float safetensors; the default without); repeat for both, "
        "each then in DIR/<format>",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="per-block checkpoints: pruned blocks kept there memory-mapped (host memory about one "
        "block), and a rerun of the same job with the same DIR resumes after its last finished block",
    )
    p.add_argument("--report", help="write the report as JSON to this file")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of unexpected errors")
    return p


def _local(value: str) -> str:
    """Files named on the command line are absolute in the spec (it holds no relative paths)."""
    return value if value in BUILTIN_DATASETS else str(Path(value).expanduser().resolve())


def spec_data(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec (as a JSON-like dict) the arguments describe."""
    model = args.model
    if Path(model).expanduser().exists():  # a local directory or .gguf file, else a Hub id
        model = str(Path(model).expanduser().resolve())
    data: dict[str, Any] = {"model": model}
    for name, value in vars(args).items():
        if name.startswith(_SPEC):
            set_path(data, tuple(name[len(_SPEC) :].split(".")), value)
    profile = data.get("sparsity_profile")
    if isinstance(profile, str) and profile.startswith("@"):  # @file.json: a JSON list, one sparsity per block
        data["sparsity_profile"] = _profile_file(profile[1:])
    calibration = data.get("calibration", {}).get("dataset")
    if calibration is not None:
        data["calibration"]["dataset"] = _local(calibration)
    datasets = [] if args.no_eval else [_local(v) for v in (args.eval_sets or ["wikitext2"])]
    set_path(data, ("evaluation", "datasets"), datasets)
    return data


class ArgumentFileError(ValueError):
    """A file named by an argument cannot be read as what it must hold (one line, exit 2)."""


def _profile_file(name: str) -> list:
    try:
        value = json.loads(Path(name).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ArgumentFileError(f"--sparsity-profile: cannot read {name!r} as JSON ({reason})") from None
    if not isinstance(value, list):
        raise ArgumentFileError(f"--sparsity-profile: {name!r} must hold a JSON list, one sparsity per block")
    return value


def _flag(path: tuple[str, ...]) -> str:
    if path == ("model",):
        return "MODEL"
    if path == ("evaluation", "datasets"):
        return "--eval"
    return next((leaf.ui.cli for leaf in leaf_fields() if leaf.path == path and leaf.ui.cli), ".".join(path))


def describe(err: ValidationError) -> str:
    """Every problem of the spec on one line, each named by its flag."""
    return "; ".join(f"{_flag(error_path(e))}: {plain_message(e)}" for e in err.errors())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = JobSpec.model_validate(spec_data(args))
    except ValidationError as err:
        print(f"{PROG}: error: {describe(err)}", file=sys.stderr)
        return EXIT_USAGE
    except ArgumentFileError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    problem = path_problem(spec, args)
    if problem is None:
        spec, problem = builtin_sets_here(spec, args)
    if problem:  # before torch and the model load: a typo costs a second, not a minute
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return _run(spec, args)


def builtin_sets_here(spec: JobSpec, args: argparse.Namespace) -> tuple[JobSpec, str | None]:
    """The built-in sets this machine cannot load now (offline, or no Hub, and not cached): the
    default evaluation set is left out with a note; a set the user named, or the default
    calibration set a method needs, is an error saying what to give instead."""
    from worker.engine.contract.hub import dataset_unavailable

    cal = spec.calibration.dataset
    if spec.reads_calibration and cal in BUILTIN_DATASETS and (why := dataset_unavailable(cal)):
        if hasattr(args, _SPEC + "calibration.dataset"):
            return spec, f"--calibration {cal}: {why}"
        return spec, (
            f"no --calibration given, and its default, {cal}, cannot be loaded here: {why}. "
            "Give --calibration FILE (a .txt or .jsonl file)"
        )
    named = [d for d in spec.evaluation.datasets if d in BUILTIN_DATASETS]
    missing = {d: why for d in named if (why := dataset_unavailable(d))}
    if not missing:
        return spec, None
    if args.eval_sets:  # named by the user
        name, why = next(iter(missing.items()))
        return spec, f"--eval {name}: {why}"
    print(
        f"{PROG}: note: no --eval given and its default, {', '.join(missing)}, cannot be loaded here, so no "
        "perplexity is measured; give --eval FILE for one",
        file=sys.stderr,
    )
    kept = [d for d in spec.evaluation.datasets if d not in missing]
    return spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"datasets": kept})}), None


def path_problem(spec: JobSpec, args: argparse.Namespace) -> str | None:
    """The first file or directory named on the command line that cannot be used, in words."""
    model = Path(args.model).expanduser()
    if not model.exists() and (
        args.model.startswith((".", "/", "~")) or args.model.endswith(".gguf") or args.model.count("/") > 1
    ):
        return f"model {args.model!r} does not exist (a Hub id is ORG/NAME)"
    named = [("--calibration", spec.calibration.dataset)] + [("--eval", d) for d in spec.evaluation.datasets]
    for flag, name in named:
        if name in BUILTIN_DATASETS or not Path(name).is_absolute():
            continue
        if not Path(name).is_file():
            return f"{flag} {name!r} does not exist"
        if not os.access(name, os.R_OK):
            return f"{flag} {name!r}: not readable"
    # (--eval-include's directories are checked with the tasks: the engine's own message, before any load)
    name = args.checkpoint_dir
    if name and Path(name).expanduser().exists() and not Path(name).expanduser().is_dir():
        return f"--checkpoint-dir {name!r}: not a directory"
    if args.formats and not args.output:
        return "--format says what --output writes: set --output DIR"
    if "compressed-tensors" in (args.formats or ()) and spec.quantization is None:
        return "--format compressed-tensors holds quantized weights: set --quantize SCHEME"
    if args.report and not Path(args.report).parent.exists():
        return f"report directory {str(Path(args.report).parent)!r} does not exist"
    if args.output:
        out = Path(args.output).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            return f"output directory {str(out)!r} exists and is not empty"
        parent = next((p for p in [out, *out.parents] if p.exists()), None)
        if parent is not None and not os.access(parent, os.W_OK):
            return f"output directory {str(out)!r}: {str(parent)!r} is not writable"
    return None


def _run(spec: JobSpec, args: argparse.Namespace) -> int:
    from worker.engine.contract import hub

    names = [spec.calibration.dataset, *spec.evaluation.datasets]
    if not hub.offline() and (not Path(spec.model).is_absolute() or any(n in BUILTIN_DATASETS for n in names)):
        hub.start(spec.model if not Path(spec.model).is_absolute() else "", spec.revision)  # while torch loads
    # Imported after the arguments are checked, so --help and argument errors are instant.
    from worker.engine.errors import EngineError, JobCancelled
    from worker.engine.pipeline import RunOptions, run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = RunOptions(
        device=args.device,
        output=args.output,
        batch_size=args.batch_size,
        resume_dir=args.checkpoint_dir,
        formats=tuple(dict.fromkeys(args.formats or ())),
        task_dirs=tuple(str(Path(d).expanduser().resolve()) for d in args.task_dirs),
    )
    on_progress, close = (None, lambda ok=True: None)
    if not args.quiet:
        from worker.engine.progress import console_reporter

        on_progress, close = console_reporter()
    try:
        report = run(spec, options, on_progress=on_progress)
    except JobCancelled:
        close(False)
        return 130
    except KeyboardInterrupt:
        close(False)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except EngineError as exc:
        close(False)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an environment problem: one line unless --verbose
        close(False)
        if args.verbose:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    close()
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
