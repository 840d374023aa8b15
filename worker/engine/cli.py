"""``sparsegpt prune MODEL``: the engine alone, from the command line.

Bad input ends with one line on stderr and exit code 2; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as argparse does, without the usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sparsegpt prune", description="Prune a causal LM one-shot with SparseGPT "
                "(or the magnitude / Wanda baselines) and report its perplexity.")
    p.add_argument("model", help="Hugging Face model id, local model directory, or .gguf file")
    p.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    p.add_argument("--sparsity", default="0.5", help="a ratio (0.5) or N:M zeros per group (2:4, 4:8)")
    p.add_argument("--calibration", default="c4", help="c4, wikitext2, ptb, or a .txt/.jsonl file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, help="tokens per sequence (default min(2048, model context))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="solver column block (default 128)")
    p.add_argument("--percdamp", type=float, default=0.01, help="Hessian dampening (default 0.01)")
    p.add_argument("--wbits", type=int, help="jointly quantize weights to this many bits (2-8)")
    p.add_argument("--eval", dest="eval_sets", action="append", metavar="NAME|FILE",
                   help="perplexity set (wikitext2, c4, ptb or a file); repeatable; default wikitext2")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    p.add_argument("--no-dense-eval", action="store_true", help="do not evaluate the dense model")
    p.add_argument("--eval-windows", type=int, help="at most this many windows per evaluation set")
    p.add_argument("--first-block", type=int, help="first decoder block to prune (0-based)")
    p.add_argument("--last-block", type=int, help="last decoder block to prune (inclusive)")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="prune only modules whose full name matches (e.g. '*.mlp.*'); repeatable")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="never prune modules whose full name matches; repeatable")
    p.add_argument("--batch-size", type=int, help="sequences per block forward (default ~16k tokens)")
    p.add_argument("--exact", action="store_true",
                   help="reproduce the reference SparseGPT's arithmetic bit for bit (one sequence per "
                        "forward, its Hessian, inverse and column loop); slower, for checking results")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--output", "-o", help="directory to save the pruned model in")
    p.add_argument("--report", help="write the report as JSON to this file")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of unexpected errors")
    return p


def summary(report: dict) -> str:
    lines = [f"{report['method']} {report['pattern']}: sparsity {report['sparsity']:.4f} over "
             f"{len(report['layers'])} layers, prune {report['seconds']['prune']:.1f} s, "
             f"total {report['seconds']['total']:.1f} s, peak memory {report['peak_memory_bytes'] / 2**30:.2f} GiB"]
    for name, ppl in report["perplexity"].items():
        dense = report["dense_perplexity"].get(name)
        before = f"{dense:.3f} -> " if dense is not None else ""
        lines.append(f"perplexity {name}: {before}{ppl:.3f}")
    if report.get("output"):
        lines.append(f"saved to {report['output']} (a dense safetensors checkpoint with zeros)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so --help and argument errors are instant.
    from worker.engine.errors import EngineError, JobCancelled
    from worker.engine.pipeline import PruneJob, run_job

    eval_sets = [] if args.no_eval else (args.eval_sets or ["wikitext2"])
    job = PruneJob(
        model=args.model, sparsity=args.sparsity, method=args.method, revision=args.revision,
        trust_remote_code=args.trust_remote_code, calibration=args.calibration,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, blocksize=args.blocksize,
        percdamp=args.percdamp, wbits=args.wbits, eval_sets=eval_sets,
        eval_windows=args.eval_windows, eval_dense=not args.no_dense_eval, device=args.device,
        dtype=args.dtype, output=args.output, first_block=args.first_block,
        last_block=args.last_block, include=args.include, exclude=args.exclude,
        batch_size=args.batch_size, exact=args.exact,
    )
    prog = "sparsegpt prune"
    if args.report and not Path(args.report).parent.exists():
        print(f"{prog}: error: report directory {str(Path(args.report).parent)!r} does not exist", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    on_progress, close = (None, lambda: None)
    if not args.quiet:
        from worker.engine.progress import console_reporter

        on_progress, close = console_reporter()
    try:
        report = run_job(job, on_progress=on_progress)
    except JobCancelled:
        close()
        return 130
    except KeyboardInterrupt:
        close()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EngineError as exc:
        close()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug or an environment problem: one line unless --verbose
        close()
        if args.verbose:
            raise
        print(f"{prog}: error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)",
              file=sys.stderr)
        return 1
    close()
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
