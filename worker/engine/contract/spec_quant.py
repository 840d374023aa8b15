"""The job spec's ``quantization`` section and the checks the spec alone cannot make (issue 26).

``QuantizationSpec``: a compressed-tensors preset scheme (W4A16, W8A16: symmetric INT; FP8_DYNAMIC),
its group size (-1: one scale per output channel) and act order (static groups). The refusals are
worded here once, so the API, the form and the CLI say the same. ``group_size_problems(config)``
checks a group size against a model's config.json (a dict): the layers whose input width it does
not divide and the group sizes that would divide them all; the engine calls it after loading the
config, the API at submit.

Pure Python + pydantic: importing this module loads no torch (the API imports it through the spec).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMES = ("W4A16", "W8A16", "FP8_DYNAMIC")
SCHEME_BITS = {"W4A16": 4, "W8A16": 8, "FP8_DYNAMIC": 8}
DEFAULT_GROUP_SIZE = 128
FORMATS = ("compressed-tensors", "dense")  # a quantized job's saved formats (RunOptions.formats)
CANDIDATE_GROUPS = (256, 128, 64, 32, 16)  # offered when the asked one does not divide every width

# The shared wording of each refusal (API 422, form, CLI).
FP8_GROUP = (
    "quantization.group_size: FP8_DYNAMIC has one scale per output channel; set group_size -1 (got {group_size})"
)
BAD_GROUP = "quantization.group_size must be a positive number of input columns or -1 (per channel), not {group_size}"
WITH_EXACT = (
    "quantization cannot be combined with solver.exact: the reference SparseGPT has no group-wise grids to reproduce"
)
WITH_WBITS = (
    "solver.wbits (the reference's per-row asymmetric grid, kept for old specs) and quantization "
    "are two grids: set one of them"
)
ACTORDER_NM = (
    "quantization.actorder solves the columns out of order, which N:M patterns cannot follow "
    "(their groups are consecutive columns): use an unstructured sparsity or actorder false"
)
WITH_REFIT = (
    "solver.refit with quantization: sparsegpt applies the grid inside its solve, which measured better "
    "than a refit followed by round-to-nearest (SmolLM2-135M, blocks 0-5 at 50% + W4A16 group 64: "
    "perplexity 39.78 in the solve vs 41.49 refit then rounded; benchmarks/refit_quant_p.py): set refit none"
)
NO_SCHEME = "quantization.scheme is required to quantize (one of W4A16, W8A16, FP8_DYNAMIC)"

UI_MARKERS: dict[str, dict[str, Any]] = {  # spec.UI's arguments per field (spec.py attaches them)
    "scheme": {"form": "quant_scheme", "cli": "--quantize"},
    "group_size": {"form": "quant_group_size", "cli": "--group-size"},
    "actorder": {"form": "quant_actorder", "cli": "--actorder"},
}


def empty_as_none(value: Any) -> Any:
    """A section without a scheme (a form's empty select) is no quantization, unless it sets something
    else: then it is refused (``--group-size 64`` alone is a mistake, not a silent no-op)."""
    if isinstance(value, dict) and value.get("scheme") in (None, ""):
        group, actorder = value.get("group_size"), value.get("actorder")
        if group not in (None, "", DEFAULT_GROUP_SIZE, str(DEFAULT_GROUP_SIZE)) or actorder not in (
            None,
            "",
            False,
            "false",
            "off",
        ):
            raise ValueError(NO_SCHEME)
        return None
    return value


def quantization_spec(ui: type) -> type[BaseModel]:
    """The section's model with ``ui`` (spec.UI) markers: built here, the UI class being spec.py's."""

    class QuantizationSpec(BaseModel):
        """Weights quantized by the job (compressed-tensors preset schemes); null: none."""

        model_config = ConfigDict(extra="forbid")
        scheme: Annotated[
            Literal[SCHEMES],
            Field(
                description="W4A16 / W8A16: 4 / 8-bit symmetric integer weights, 16-bit activations; FP8_DYNAMIC: "
                "FP8 weights per output channel and FP8 activations per token"
            ),
            ui(**UI_MARKERS["scheme"]),
        ]
        group_size: Annotated[
            int,
            Field(
                ge=-1,
                le=1 << 20,
                description="input columns sharing one scale; -1: one per output channel (FP8_DYNAMIC: -1)",
            ),
            ui(**UI_MARKERS["group_size"]),
        ] = DEFAULT_GROUP_SIZE
        actorder: Annotated[
            bool,
            Field(
                description="solve the columns in descending Hessian diagonal order "
                "(static groups: nothing extra is saved); sparsegpt only"
            ),
            ui(**UI_MARKERS["actorder"]),
        ] = False

        @model_validator(mode="before")
        @classmethod
        def _fp8_default(cls, data: Any) -> Any:
            """FP8_DYNAMIC without a group size means per channel (the preset's only choice)."""
            if isinstance(data, dict) and data.get("scheme") == "FP8_DYNAMIC" and data.get("group_size") in (None, ""):
                return {**data, "group_size": -1}
            return data

        @model_validator(mode="after")
        def _groups(self):
            if self.group_size == 0:
                raise ValueError(BAD_GROUP.format(group_size=self.group_size))
            if self.scheme == "FP8_DYNAMIC" and self.group_size != -1:
                raise ValueError(FP8_GROUP.format(group_size=self.group_size))
            return self

        @property
        def bits(self) -> int:
            return SCHEME_BITS[self.scheme]

    return QuantizationSpec


def check_quantization(quantization, method_joint: bool, solver, pattern) -> None:
    """The cross-field refusals (ValueError with the shared wording); ``method_joint``: the method
    quantizes inside its solve (else round-to-nearest after the prune)."""
    if quantization is None:
        return
    if solver.exact:
        raise ValueError(WITH_EXACT)
    if solver.wbits is not None:
        raise ValueError(WITH_WBITS)
    if method_joint and solver.refit != "none":  # the other methods round after the prune anyway: refit kept
        raise ValueError(WITH_REFIT)
    if quantization.actorder and not method_joint:
        raise ValueError(
            "quantization.actorder orders the columns of the joint solve: it works with method "
            "sparsegpt only (the others round to nearest after the prune)"
        )
    if quantization.actorder and pattern.structured:
        raise ValueError(ACTORDER_NM)


# --- the group size against a model's config.json (no torch, no model) ----------------------------------


def _text_config(config: dict) -> dict:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def linear_widths(config: dict) -> list[tuple[str, int]]:
    """(layer kind, input width) of the decoder's Linears as config.json describes them: attention
    and MLP inputs read hidden_size, o_proj heads x head_dim, down_proj the intermediate size, an
    expert's down_proj moe_intermediate_size. Only the sizes the config states."""
    c = _text_config(config)
    hidden = c.get("hidden_size") or c.get("d_model") or c.get("n_embd")
    widths: list[tuple[str, int]] = []
    if isinstance(hidden, int):
        widths.append(("q/k/v_proj, gate/up_proj (hidden_size)", hidden))
    heads, head_dim = c.get("num_attention_heads") or c.get("n_head"), c.get("head_dim")
    if isinstance(heads, int) and isinstance(hidden, int):
        o_in = heads * (head_dim if isinstance(head_dim, int) else hidden // heads)
        if o_in != hidden:
            widths.append(("o_proj (heads x head_dim)", o_in))
    inter = c.get("intermediate_size") or c.get("ffn_dim") or c.get("n_inner")
    if isinstance(inter, int):
        widths.append(("down_proj (intermediate_size)", inter))
    moe_inter = c.get("moe_intermediate_size")
    if isinstance(moe_inter, int):
        widths.append(("experts' down_proj (moe_intermediate_size)", moe_inter))
    shared = c.get("shared_expert_intermediate_size")
    if isinstance(shared, int):
        widths.append(("shared expert's down_proj (shared_expert_intermediate_size)", shared))
    return widths


def group_size_problems(config: dict, group_size: int) -> tuple[list[tuple[str, int]], list[int]]:
    """(the (layer kind, width) pairs ``group_size`` does not divide, the group sizes that divide them
    all, largest first); ([], ...) when it fits or is -1 (per channel)."""
    widths = linear_widths(config)
    fits = [g for g in CANDIDATE_GROUPS if all(w % g == 0 for _, w in widths)]
    if group_size == -1:
        return [], fits
    return [(kind, w) for kind, w in widths if w % group_size], fits


def group_size_message(config: dict, group_size: int) -> str | None:
    """The shared sentence for a group size that does not fit the model, else None."""
    bad, fits = group_size_problems(config, group_size)
    if not bad:
        return None
    layers = "; ".join(f"{kind} {width} wide" for kind, width in bad)
    offer = (
        f"group sizes that divide every layer: {', '.join(map(str, fits))}, or -1 (per channel)"
        if fits
        else "use -1 (one scale per output channel)"
    )
    return f"quantization.group_size {group_size} does not divide the input width of {layers}: {offer}"
