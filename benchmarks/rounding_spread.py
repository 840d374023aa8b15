"""How far float rounding alone moves the reference procedure's perplexity on protocol P.

    python benchmarks/rounding_spread.py --sparsity 0.5 [--json OUT]

Runs benchmarks/reference_sparsegpt.py unchanged but for one thing that is equal in exact
arithmetic: the Hessian is summed over the calibration sequences and scaled by 2/n once at
the end, instead of the running average ``H *= n/(n+1); H += (2/n) x x^T`` after every
sequence. Any difference to the plain reference's perplexity is rounding, amplified through
SparseGPT's near-tie mask choices over 30 blocks; it is the yardstick for reading a "within
1%" perplexity target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference_sparsegpt as ref  # noqa: E402


class SummedHessianLayer(ref.SparseGPTLayer):
    """The reference layer with H = (2/n) * sum x x^T formed once, at the end."""

    def add_batch(self, inp) -> None:
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        self.nsamples += inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()
        self.H += x @ x.t()

    def prune(self, *args, **kwargs) -> float:
        self.H *= 2 / self.nsamples
        return super().prune(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", default="0.5")
    ref.add_protocol_args(p)
    a = p.parse_args(argv)
    ref.SparseGPTLayer = SummedHessianLayer  # what prune_sequential instantiates
    result = ref.run(
        "sparsegpt",
        a.sparsity,
        model_path=a.model,
        calibration=a.calibration,
        eval_file=a.eval_file,
        nsamples=a.nsamples,
        seqlen=a.seqlen,
        seed=a.seed,
        eval_limit=a.eval_windows,
        blocksize=a.blocksize,
        percdamp=a.percdamp,
        threads=a.threads,
        do_eval=not a.no_eval,
    )
    result["runner"] = "reference, Hessian summed then scaled"
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
