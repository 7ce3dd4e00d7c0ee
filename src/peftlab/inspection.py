"""What an adapter does to its model, layer by layer: ``peftlab inspect``.

For every layer whose method has a weight delta ΔW (LoRA, LoHa, IA3, ...):

* ‖ΔW‖_F and ‖ΔW‖_F / ‖W‖_F, with W the frozen base weight;
* the effective rank of ΔW (Roy & Vetterli 2007, https://infoscience.epfl.ch/record/110188):
  exp(H(p)) with p_i = σ_i / Σ_j σ_j, the exponential of the entropy of the normalised singular
  values — r when r singular values are equal, close to 1 when one dominates — and the numeric
  rank, the count of σ_i above the tolerance σ_max · max(d_out, d_in) · eps(dtype) (NumPy's
  ``matrix_rank`` rule). Singular values under that tolerance are rounding noise of ΔW's own
  computation, so they are left out of the entropy too: effective rank ≤ numeric rank;
* the merge check: merge the layer alone and measure max |merged − (W + ΔW)|, unmerge and measure
  max |unmerged − W|; the base weights are then put back bit for bit.

Adapters with no weight delta (virtual tokens, attention prefixes, bottleneck branches, full copies
of heads) get one line each saying what they are and how many parameters they hold.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from .attention import AttentionAdapter
from .config import ConfigError
from .layers import ModulesToSaveLayer
from .model import PeftModel
from .prompts import PromptAdapter
from .targeting import unwrap


@dataclass(frozen=True)
class LayerDelta:
    """The weight delta of one adapter on one module."""

    path: str
    shape: tuple[int, ...]
    """ΔW's shape, in the base weight's layout ((in, out) for GPT-2's Conv1D)."""
    norm: float
    """‖ΔW‖_F."""
    relative_norm: float
    """‖ΔW‖_F / ‖W‖_F (inf when W is zero)."""
    effective_rank: float
    numeric_rank: int
    merge_error: float | None
    """max |merged − (W + ΔW)|; None when the layer cannot be merged on its own (stacked methods,
    or something already merged there)."""
    unmerge_error: float | None
    """max |unmerged − W| after that merge."""
    parameters: int
    """The adapter's parameters on this module."""


@dataclass(frozen=True)
class Report:
    """``inspect_adapter``'s result; :meth:`render` is the text table, :meth:`to_json` the JSON."""

    adapter: str
    method: str
    model: str
    layers: tuple[LayerDelta, ...]
    notes: tuple[str, ...]
    """One line per part of the adapter without a weight delta."""
    adapter_parameters: dict[str, int]
    """Parameters of every adapter on the model (trainable or loaded frozen), by name."""
    total_parameters: int
    """Every parameter of the model, base and all adapters, shared tensors counted once."""

    @property
    def share(self) -> float:
        """This adapter's parameters as a fraction of the total."""
        return self.adapter_parameters[self.adapter] / max(1, self.total_parameters)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["share"] = self.share
        return out

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2)

    def render(self) -> str:
        lines = [f"adapter {self.adapter!r}: {self.method} on {self.model}, "
                 f"{len(self.layers)} module(s) with a weight delta"]
        if self.layers:
            header = ("module", "shape", "‖ΔW‖_F", "‖ΔW‖/‖W‖", "eff.rank", "rank", "merge err", "unmerge err", "params")
            rows = [(d.path, "×".join(map(str, d.shape)), f"{d.norm:.4g}", f"{d.relative_norm:.3g}",
                     f"{d.effective_rank:.2f}", str(d.numeric_rank), _err(d.merge_error), _err(d.unmerge_error),
                     f"{d.parameters:,d}") for d in self.layers]
            widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
            for row in [header] + rows:
                lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        lines += self.notes
        counts = ", ".join(f"{n!r} {c:,d}" for n, c in self.adapter_parameters.items())
        lines.append(f"parameters: {counts}; {self.adapter!r} is {100 * self.share:.4f}% of "
                     f"{self.total_parameters:,d} in all")
        return "\n".join(lines)


def _err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1e}"


def _finite(obj):
    """inf (ΔW over a zero base weight) is not JSON; null says "undefined" just as well."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """σ of ``delta`` (2-D), descending, in float64 on the CPU."""
    return torch.linalg.svdvals(delta.detach().to("cpu", torch.float64))


def numeric_rank(sigma: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Singular values above σ_max · max(shape) · eps(dtype): ``dtype`` is the one ΔW was computed in."""
    if sigma.numel() == 0 or sigma[0] == 0:
        return 0
    return int((sigma > sigma[0] * max(shape) * torch.finfo(dtype).eps).sum())


def effective_rank(sigma: torch.Tensor, rank: int | None = None) -> float:
    """exp of the entropy of σ / Σσ over the first ``rank`` singular values (all by default)."""
    sigma = sigma[: sigma.numel() if rank is None else rank]
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def _merge_check(layer, name: str) -> tuple[float | None, float | None]:
    """Merge ``name`` on this layer alone, compare with W + ΔW, unmerge, compare with W; then put
    every base tensor back exactly (merge and unmerge round, and IA3 also rescales the bias)."""
    if layer.merged:
        return None, None
    base = unwrap(layer.base_layer)
    saved = {k: p.detach().clone() for k, p in base.named_parameters()}
    weight = layer.base_weight
    saved_weight = weight.detach().clone()
    expected = saved_weight + layer.delta_weight(name).to(weight.dtype)
    try:
        layer.merge(name)
    except NotImplementedError:  # stacked on another method's layer: merging is refused there
        return None, None
    try:
        merge_error = float((weight - expected).abs().max())
    finally:
        layer.unmerge()
    unmerge_error = float((weight - saved_weight).abs().max())
    for key, value in saved.items():
        base.get_parameter(key).copy_(value)
    return merge_error, unmerge_error


def _delta_or_none(layer, name: str) -> torch.Tensor | None:
    if not layer.mergeable:
        return None
    try:
        return layer.delta_weight(name).detach()
    except NotImplementedError:  # mergeable without a ΔW of its own (full copies of heads)
        return None


def inspect_adapter(peft_model: PeftModel, adapter_name: str = "default") -> Report:
    """Measure adapter ``adapter_name`` on ``peft_model``; the model is left exactly as it was."""
    if adapter_name not in peft_model.peft_config:
        raise ConfigError(f"no adapter {adapter_name!r} on this model; adapters: {sorted(peft_model.peft_config)}")
    method = peft_model.peft_config[adapter_name].method
    layers, notes = [], []
    copies, no_delta = {}, {}
    for path, layer in peft_model.adapter_layers(adapter_name):
        params = sum(t.numel() for t in layer.adapter_state(adapter_name).values())
        delta = _delta_or_none(layer, adapter_name)
        if delta is None:
            group = copies if isinstance(layer, ModulesToSaveLayer) else no_delta
            group[path] = params
            continue
        sigma = singular_values(delta)
        rank = numeric_rank(sigma, tuple(delta.shape), delta.dtype)
        w_norm = float(layer.base_weight.detach().double().norm())
        norm = float(sigma.square().sum().sqrt())
        merge_error, unmerge_error = _merge_check(layer, adapter_name)
        layers.append(LayerDelta(path, tuple(delta.shape), norm, norm / w_norm if w_norm else math.inf,
                                 effective_rank(sigma, rank), rank, merge_error, unmerge_error, params))
    if no_delta:
        notes.append(f"{method}: no weight delta (a computation added to {len(no_delta)} module(s)); "
                     f"{sum(no_delta.values()):,d} parameters")
    if adapter_name in peft_model.model_adapters:
        module = peft_model.model_adapters[adapter_name]
        what = ("virtual tokens" if isinstance(module, PromptAdapter)
                else "keys/values inside attention" if isinstance(module, AttentionAdapter)
                else type(module).__name__)
        count = sum(t.numel() for t in module.adapter_state().values())
        notes.append(f"{method}: no weight delta ({what}); {count:,d} parameters")
    if copies:
        notes.append(f"modules_to_save: full trained copies of {', '.join(copies)}; "
                     f"{sum(copies.values()):,d} parameters")
    counts = {n: sum(t.numel() for t in peft_model.adapter_state_dict(n).values()) for n in peft_model.peft_config}
    return Report(adapter_name, method, type(peft_model.base_model).__name__, tuple(layers), tuple(notes),
                  counts, peft_model.trainable_parameters()[1])
