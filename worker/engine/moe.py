"""Mixture-of-experts blocks: every expert pruned with the Hessian of the tokens routed to it.

transformers 5 keeps a block's experts as fused 3-D parameters of one module, decorated with
``use_experts_implementation``: ``gate_up_proj`` (E, 2I, H) (or ``up_proj`` (E, I, H) without a
gate) and ``down_proj`` (E, H, I); ``is_transposed`` stores each expert's matrix as (in, out)
instead (gpt-oss). The module is called as ``experts(hidden (T, H), top_k_index (T, k),
top_k_weights (T, k))``. No nn.Linear is involved, so no Linear hook sees an expert's input.

Llama 4 keeps another layout (``is_scaled_bmm``): ``gate_up_proj`` (E, H, 2I) and ``down_proj``
(E, I, H), each expert's matrix stored (in, out), called as ``experts(routed_in (E * T, H))``
where expert e's T rows are every token's hidden state times the router's score for e (sigmoid;
exactly 0 for a token not routed to e). What its Linear reads is that scaled row, so its Hessian
is made from the nonzero rows; the unscaled hidden states (for ``all_experts`` and the fallback)
are taken from the input of the MoE module that holds the experts.

During the block's calibration pass the experts module's forward is replaced by
``ExpertCollector._forward``, which computes what the model's own experts compute (the routed
tokens through each expert, weighted and summed) and on the way accumulates, per expert,

- the Hessian of its ``gate_up_proj``/``up_proj`` from the hidden states routed to it, and
- the Hessian of its ``down_proj`` from its activated intermediate (gate(x) * up(x)) on those tokens;

each H = (2 / tokens) * sum over the tokens of x x^T (its scale does not change the solve). With
``all_experts`` every calibration token goes through every expert for the statistics only (the
block's output still follows the router), as llm-compressor's ``moe_calibrate_all_experts``.

An expert the router sent fewer than ``min_tokens`` tokens is the **fallback**: its Hessians are
remade from all calibration tokens in one more pass over the block (for those experts only),
and the report says so per expert. Each expert's matrix, seen as the 2-D (out, in) matrix of a
Linear, then gets the job's method and pattern (N:M along its input dimension).

Routers (gates) are never pruned: they are not Linears here, or are excluded by
``is_router``. A shared expert is an ordinary MLP of Linears and is pruned as one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from worker.engine.contract.method_table import method_info
from worker.engine.methods import prune_layers

MATRICES = ("gate_up_proj", "up_proj", "down_proj")
_ROUTER_NAME = re.compile(r"(^|\.)(router|gate|router_gate|shared_expert_gate|expert_gate)$")  # a name inside the block


@dataclass
class MoeSettings:
    all_experts: bool = False  # every calibration token through every expert (statistics only)
    min_tokens: int = 128  # fewer routed tokens than this: the expert's Hessians from all tokens


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module whose fused 3-D weights this file knows how to prune."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and module.down_proj.dim() == 3
    ) or is_scaled_bmm(module)


def is_scaled_bmm(module: nn.Module) -> bool:
    """Llama 4's experts layout (see the module's doc): inputs scaled by the router, one bmm."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    width = getattr(module, "expert_dim", None)
    return (
        not hasattr(module, "is_transposed")
        and isinstance(getattr(module, "num_experts", None), int)
        and isinstance(width, int)
        and isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[2] == 2 * width
        and down.shape[1] == width
        and gate_up.shape[1] == down.shape[2]
        and callable(getattr(module, "act_fn", None))
    )


def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The block's fused experts modules, by name inside the block, in registration order."""
    return {name: m for name, m in block.named_modules() if is_fused_experts(m)}


def is_router(name: str, module: nn.Module) -> bool:
    """A router / gate that picks experts (never pruned): a module named ``gate``/``router``
    (``shared_expert_gate``...) or whose class is a router. ``gate_proj`` is not one."""
    cls = type(module).__name__.lower()
    return bool(_ROUTER_NAME.search(name)) or "router" in cls or cls.endswith("gate")


def matrix_names(experts: nn.Module) -> list[str]:
    """The fused parameters of one experts module, in the order they act: gate_up (or up), down."""
    return [
        n for n in MATRICES if isinstance(getattr(experts, n, None), nn.Parameter) and getattr(experts, n).dim() == 3
    ]


def expert_matrix(experts: nn.Module, pname: str, e: int) -> torch.Tensor:
    """Expert ``e``'s weight as a Linear's (out_features, in_features) matrix (a view)."""
    W = getattr(experts, pname).data[e]
    return W.t() if getattr(experts, "is_transposed", False) or is_scaled_bmm(experts) else W


def set_expert_matrix(experts: nn.Module, pname: str, e: int, W: torch.Tensor) -> None:
    expert_matrix(experts, pname, e).copy_(W.to(getattr(experts, pname).dtype))


def _linear(experts: nn.Module, pname: str, e: int, x: torch.Tensor) -> torch.Tensor:
    y = F.linear(x, expert_matrix(experts, pname, e))
    if getattr(experts, "has_bias", False):
        y = y + getattr(experts, f"{pname}_bias")[e]
    return y


def expert_intermediate(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """What expert ``e``'s down projection reads for the tokens ``x`` (T, H): gate(x) * up(x)."""
    if is_scaled_bmm(experts):  # Llama 4: gate first, then up, in one matrix
        gate, up = _linear(experts, "gate_up_proj", e, x).chunk(2, dim=-1)
        return up * experts.act_fn(gate)
    if experts.has_gate:
        return experts._apply_gate(_linear(experts, "gate_up_proj", e, x))
    return experts.act_fn(_linear(experts, "up_proj", e, x))


@dataclass
class ExpertStats:
    """One experts module's per-expert Hessians and routed token counts."""

    up: list = field(default_factory=list)  # accumulator per expert, of the gate_up (up) input
    down: list = field(default_factory=list)  # of the down input
    tokens: list[int] = field(default_factory=list)  # routed to each expert, over the calibration data
    source: list[str] = field(default_factory=list)  # "routed" | "all_tokens" | "all_tokens_fallback"


class ExpertCollector:
    """Replaces each experts module's forward for the calibration pass (see the module's doc)."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        device: torch.device,
        settings: MoeSettings,
        hessian: Callable[[int, torch.device], object],
        block: nn.Module | None = None,
    ):
        self.modules, self.device, self.settings, self.hessian = modules, device, settings, hessian
        self._plain: dict[str, torch.Tensor] = {}  # scaled-bmm experts: the MoE module's input, unscaled
        self._hooks = []
        for name, m in modules.items():
            if is_scaled_bmm(m):
                if block is None or "." not in name:
                    raise ValueError(f"{name}: experts whose inputs arrive scaled need their MoE module's input")
                parent = block.get_submodule(name.rsplit(".", 1)[0])
                self._hooks.append(parent.register_forward_pre_hook(self._keep_plain(name), with_kwargs=True))
        source = "all_tokens" if settings.all_experts else "routed"
        self.stats = {
            name: ExpertStats(
                up=[None] * m.num_experts,
                down=[None] * m.num_experts,
                tokens=[0] * m.num_experts,
                source=[source] * m.num_experts,
            )
            for name, m in modules.items()
        }
        self._every: dict[str, set[int]] = {
            name: set(range(m.num_experts)) if settings.all_experts else set() for name, m in modules.items()
        }
        self._only: dict[str, set[int]] | None = None  # the fallback pass: these experts' statistics only
        for name, m in modules.items():
            m.forward = self._forward_of(name, m)  # an instance attribute: ``remove`` restores the class's

    def _keep_plain(self, name: str):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._plain[name] = hidden.reshape(-1, hidden.shape[-1])

        return hook

    def _forward_of(self, name: str, experts: nn.Module):
        if is_scaled_bmm(experts):
            return lambda routed_in: self._forward_scaled(name, experts, routed_in)

        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            # (top_k_index, top_k_weights), positional or by any names (gpt-oss: router_indices=, routing_weights=)
            routing = [*args, *kwargs.values()]
            index = next(t for t in routing if not t.is_floating_point())
            weights = next(t for t in routing if t.is_floating_point())
            return self._forward(name, experts, hidden_states, index, weights)

        return forward

    def _add(self, slots: list, e: int, x: torch.Tensor) -> None:
        if slots[e] is None:
            slots[e] = self.hessian(x.shape[-1], self.device)
        slots[e].add_batch(x.unsqueeze(1))  # (T, 1, cols): the accumulator counts T, H = 2/T sum x x^T

    @torch.no_grad()
    def _forward(
        self,
        name: str,
        experts: nn.Module,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The routed experts' weighted sum (transformers' eager loop), with the statistics on the way."""
        stats, every = self.stats[name], self._every[name]
        only = self._only[name] if self._only is not None else None
        final = torch.zeros_like(hidden_states)
        num = experts.num_experts
        # (E, k, T), as the eager implementation: expert e's (top-k slot, token) pairs
        mask = F.one_hot(top_k_index, num_classes=num + 1).permute(2, 1, 0)
        for e in range(num):
            slot, token = torch.where(mask[e])
            if only is None:
                stats.tokens[e] += int(token.numel())
            through_all = e in every or (only is not None and e in only)
            if token.numel() == 0 and not through_all:
                continue
            x = hidden_states if through_all else hidden_states[token]
            act = expert_intermediate(experts, e, x)
            if only is None or e in only:
                self._add(stats.up, e, x)
                self._add(stats.down, e, act)
            if token.numel() == 0:
                continue
            act = act[token] if through_all else act
            out = _linear(experts, "down_proj", e, act)
            if getattr(experts, "has_post_expert_norm", False):
                out = experts.post_expert_norm(out)
            out = out * top_k_weights[token, slot, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final

    @torch.no_grad()
    def _forward_scaled(self, name: str, experts: nn.Module, routed_in: torch.Tensor) -> torch.Tensor:
        """Llama 4's experts: the model's own output (its forward, unchanged), with the statistics
        on the way: expert e's routed tokens are its nonzero rows of ``routed_in``."""
        out = type(experts).forward(experts, routed_in)
        stats, every = self.stats[name], self._every[name]
        only = self._only[name] if self._only is not None else None
        rows = routed_in.view(experts.num_experts, -1, routed_in.shape[-1])
        for e in range(experts.num_experts):
            token = torch.nonzero(rows[e].abs().amax(-1) > 0).squeeze(1)
            if only is None:
                stats.tokens[e] += int(token.numel())
            if only is not None and e not in only:
                continue
            if e in every or only is not None:  # (the fallback pass: only its starved experts get here)
                x = self._plain[name]  # every calibration token, as the MoE module received it
            elif token.numel():
                x = rows[e][token]
            else:
                continue
            self._add(stats.up, e, x)
            self._add(stats.down, e, expert_intermediate(experts, e, x))
        return out

    def starved(self) -> dict[str, set[int]]:
        """The experts the router sent fewer than ``min_tokens`` tokens (outside all-experts mode)."""
        if self.settings.all_experts:
            return {}
        out = {
            name: {e for e, t in enumerate(s.tokens) if t < self.settings.min_tokens} for name, s in self.stats.items()
        }
        return {name: es for name, es in out.items() if es}

    def fallback(self, run_pass: Callable[[], None]) -> None:
        """Remake the starved experts' Hessians from every calibration token: one more block pass."""
        starved = self.starved()
        if not starved:
            return
        for name, es in starved.items():
            s = self.stats[name]
            for e in es:
                s.up[e] = s.down[e] = None
                s.source[e] = "all_tokens_fallback"
        self._only = {name: starved.get(name, set()) for name in self.modules}
        self._every = {name: starved.get(name, set()) for name in self.modules}
        try:
            run_pass()
        finally:
            self._only = None

    def remove(self) -> None:
        for m in self.modules.values():
            m.__dict__.pop("forward", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._plain = [], {}


def _experts_refit(fits: list[dict]) -> dict:
    """One fused parameter's refit record from its experts' (a layer's: worker.engine.refit)."""
    return {
        "mode": fits[0]["mode"],
        "error_before": sum(f["error_before"] for f in fits) / len(fits),
        "swaps": sum(f["swaps"] for f in fits),
        "seconds": sum(f["seconds"] for f in fits),
        "experts": len(fits),
    }


def expert_key(parameter: str, e: int) -> str:
    """How an expert's quantized matrix is known until it is saved: ``<fused parameter>:<expert>``."""
    return f"{parameter}:{e}"


def quantization_refusal(block: nn.Module) -> str | None:
    """Why this block's fused experts cannot be saved quantized so that transformers and vLLM load them
    (None: they can). Measured to load (worker.engine.export_ct's tests): Qwen-style ``gate_up_proj``
    (E, 2I, H) and ``down_proj`` (E, H, I), no biases, saved per expert."""
    for name, experts in fused_experts(block).items():
        if is_scaled_bmm(experts) or getattr(experts, "is_transposed", False):
            return (
                f"{name}: its experts are stored (in, out) ({type(experts).__name__}); a quantized checkpoint "
                "of that layout is not known to load in transformers or vLLM"
            )
        if getattr(experts, "has_bias", False):
            return f"{name}: experts with biases ({type(experts).__name__}) are not known to load quantized"
        if "gate_up_proj" not in matrix_names(experts) or "down_proj" not in matrix_names(experts):
            return (
                f"{name}: experts without a fused gate_up_proj ({type(experts).__name__}) are not known to "
                "load quantized"
            )
    return None


@torch.no_grad()
def prune_experts(
    modules: dict[str, nn.Module],
    stats: dict[str, ExpertStats] | None,
    solver,
    *,
    prefix: str,
    block: int,
    device: torch.device,
    prune_shared,
    quantized: dict | None = None,
) -> tuple[list[dict], list[dict]]:
    """Prune every expert of ``modules`` in place; with ``solver.quantization`` each expert's matrix is
    quantized as its own Linear (its routed Hessian, the method's way) and its codes and scales go into
    ``quantized`` under ``expert_key`` (the fused parameter holds codes x scales).

    Returns (one LayerResult's fields per fused parameter: sparsity over all its experts, error
    and loss summed over them weighted as one layer; one record per experts module: tokens and
    Hessian source per expert). ``stats`` None: no data (a method that reads none, magnitude).
    """
    # Long on purpose: per expert: its Hessian, prune, refit, quantization and record, with the sums over experts beside
    # them.
    layers, records = [], []
    for name, experts in modules.items():
        full = f"{prefix}.{name}"
        s = stats[name] if stats is not None else None
        for pname in matrix_names(experts):
            t0 = time.perf_counter()
            zeros = numel = 0
            errs, losses, damps, fits = [], [], [], []
            for e in range(experts.num_experts):
                acc = None if s is None else (s.down[e] if pname == "down_proj" else s.up[e])
                H = acc.H if acc is not None else None
                W = expert_matrix(experts, pname, e).to(device, torch.float32)
                if H is None and method_info(solver.method).needs_calibration:
                    raise RuntimeError(f"{full}: expert {e} has no calibration statistics")
                # each expert is one layer with its own H: the job's method (and refit), as for a Linear
                [P], [(err, loss, damp, fit)], grids = prune_layers([W], H, solver, prune_shared)
                if grids is not None and quantized is not None:
                    q = grids[0]
                    quantized[expert_key(f"{full}.{pname}", e)] = type(q)(q.codes.cpu(), q.scale.cpu(), q.weight.cpu())
                if fit is not None:
                    fits.append(fit)
                set_expert_matrix(experts, pname, e, P.to(expert_matrix(experts, pname, e).device))
                written = expert_matrix(experts, pname, e)
                zeros += int((written == 0).sum().item())
                numel += written.numel()
                errs.append(err)
                losses.append(loss)
                damps.append(damp)
            layers.append(
                {
                    "block": block,
                    "name": f"{full}.{pname}",
                    "sparsity": zeros / numel,
                    "error": None if errs[0] is None else sum(errs) / len(errs),
                    "loss": None if losses[0] is None else sum(losses),
                    "percdamp": max(damps),
                    "seconds": time.perf_counter() - t0,
                    "target": solver.pattern.sparsity,
                    "refit": _experts_refit(fits) if fits else None,
                }
            )
        records.append(
            {
                "block": block,
                "module": full,
                "experts": experts.num_experts,
                "tokens": list(s.tokens) if s is not None else None,
                "hessian": list(s.source) if s is not None else None,
            }
        )
    return layers, records
