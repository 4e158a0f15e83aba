"""Record attention probabilities from diffusers ``Attention`` modules while a network runs.

diffusers' fused attention processors (``AttnProcessor2_0`` calls ``scaled_dot_product_attention``)
never materialise the attention probabilities, and diffusers has no processor that hands them out,
so :class:`RecordingAttnProcessor` recomputes attention the way diffusers' reference
``AttnProcessor`` does (``get_attention_scores`` then ``bmm``) and keeps a copy of the
probabilities. It is installed only on chosen layers, and records only at chosen denoising steps;
elsewhere it calls the processor it replaced.

Processors are read and installed with diffusers' ``AttentionMixin.attn_processors`` and
``set_attn_processor``. ``UNet2DModel`` does not inherit that mixin (``UNet2DConditionModel`` does),
so :func:`attention_processors` and :func:`set_attention_processors` do the same on any
``nn.Module`` that lacks them.

A record keeps ``(layer, step, probs, query_hw, is_cross)``: self-attention in a pixel UNet and
cross-attention to text tokens (Stable Diffusion) produce the same kind of record, and only the
rendering differs.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

__all__ = [
    "AttentionRecord",
    "AttentionRecorder",
    "RecordingAttnProcessor",
    "SUPPORTED_PROCESSORS",
    "attention_processors",
    "attention_statistics",
    "layer_name",
    "match_layers",
    "set_attention_processors",
]

#: Processors whose output :class:`RecordingAttnProcessor` reproduces.
SUPPORTED_PROCESSORS: tuple[type, ...] = (AttnProcessor, AttnProcessor2_0)

_SUFFIX = ".processor"


def attention_processors(model: torch.nn.Module) -> dict[str, Any]:
    """The attention processor of every ``Attention`` module in ``model``, by processor name."""
    if isinstance(model, AttentionMixin):
        return model.attn_processors
    return AttentionMixin.attn_processors.fget(model)  # type: ignore[attr-defined]


def set_attention_processors(model: torch.nn.Module, processors: dict[str, Any]) -> None:
    """Install one processor per ``Attention`` module of ``model`` (a full dict, by processor name)."""
    if isinstance(model, AttentionMixin):
        model.set_attn_processor(dict(processors))  # diffusers pops entries from the dict it is given
        return
    # AttentionMixin.set_attn_processor reads self.attn_processors, so it cannot run unbound: same walk, by name.
    expected = set(attention_processors(model))
    if set(processors) != expected:
        raise ValueError(
            f"processors must name every attention processor of {type(model).__name__}: "
            f"missing {sorted(expected - set(processors))}, unknown {sorted(set(processors) - expected)}."
        )
    for name, processor in processors.items():
        cast(Any, model.get_submodule(layer_name(name))).set_processor(processor)


def layer_name(processor_name: str) -> str:
    """``mid_block.attentions.0.processor`` -> ``mid_block.attentions.0``."""
    return processor_name[: -len(_SUFFIX)] if processor_name.endswith(_SUFFIX) else processor_name


def match_layers(processor_names: Iterable[str], patterns: Sequence[str] | None, field: str = "layers") -> list[str]:
    """The processor names matched by any glob pattern (all when ``patterns`` is ``None``).

    A pattern may be written against the processor name (``mid_block.attentions.0.processor``) or
    the layer name (``mid_block.attentions.0``); ``mid_block.*`` matches both.

    Raises:
        ValueError: naming ``field`` when a pattern matches no processor.
    """
    names = list(processor_names)
    if patterns is None:
        return names
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(layer_name(n), pattern)]
        if not hits:
            raise ValueError(
                f"{field} pattern {pattern!r} matches no attention layer; available: {[layer_name(n) for n in names]}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    return [n for n in names if n in chosen]


@dataclass
class AttentionRecord:
    """The attention of one layer during one denoising step."""

    layer: str
    """Layer name, e.g. ``mid_block.attentions.0``."""
    step: int
    """Index of the denoising step in the sampling loop (0 = first, noisiest)."""
    probs: torch.Tensor
    """Attention probabilities ``(B, heads, queries, keys)``, float32 on the CPU; rows sum to 1."""
    query_hw: tuple[int, int] | None
    """Height and width of the query feature map (``None`` when the queries are not a grid)."""
    is_cross: bool
    """Keys come from ``encoder_hidden_states`` (text tokens) rather than the queries' own map."""
    head_output_norm: torch.Tensor
    """Mean over queries of the L2 norm of each head's output ``probs @ V``, ``(B, heads)``."""
    output_norm: torch.Tensor
    """Mean over queries of the L2 norm of the projected attention output (before any residual), ``(B,)``."""


class AttentionRecorder:
    """Collects :class:`AttentionRecord` s from the :class:`RecordingAttnProcessor` s it installs.

    The caller advances :attr:`step` once per denoising step (from a pipeline's
    ``callback_on_step_end``, say); processors record only while :attr:`active`.

    Args:
        steps: Denoising step indices to record (non-negative); ``None`` records every step.
        keep_last: Keep only the last ``keep_last`` batch entries: under classifier-free guidance
            the pipelines batch ``[unconditional, conditional]``, so the number of images keeps the
            conditional half. ``None`` keeps the whole batch.
    """

    def __init__(self, steps: Iterable[int] | None = None, keep_last: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r} must be >= 1 or None.")
        self.steps = None if steps is None else {int(s) for s in steps}
        self.keep_last = keep_last
        self.step = 0
        self.records: list[AttentionRecord] = []

    @property
    def active(self) -> bool:
        """Whether the current step is one to record."""
        return self.steps is None or self.step in self.steps

    def add(self, record: AttentionRecord) -> None:
        """Store one record (called by the processors)."""
        self.records.append(record)

    def reset(self) -> None:
        """Forget every record and start counting steps from 0 again."""
        self.step = 0
        self.records = []

    def processors(self, originals: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
        """A full processor dict: recording processors for ``names``, the originals elsewhere."""
        chosen = set(names)
        unknown = chosen - set(originals)
        if unknown:
            raise ValueError(f"no attention processor named {sorted(unknown)}; available: {sorted(originals)}.")
        return {
            name: RecordingAttnProcessor(self, layer_name(name), proc) if name in chosen else proc
            for name, proc in originals.items()
        }

    @contextlib.contextmanager
    def attached(self, model: torch.nn.Module, names: Iterable[str]) -> Iterator[AttentionRecorder]:
        """Install recording processors on ``names`` for the duration; the originals come back after, also on error."""
        originals = attention_processors(model)
        set_attention_processors(model, self.processors(originals, names))
        try:
            yield self
        finally:
            set_attention_processors(model, originals)


class RecordingAttnProcessor:
    """An attention processor that computes like diffusers' ``AttnProcessor`` and records the probabilities.

    The output equals the replaced processor's (``AttnProcessor`` or ``AttnProcessor2_0``, up to
    floating-point rounding): same projections, norms, scale, mask, residual and rescaling. While
    the recorder is inactive it simply calls the replaced processor.

    Args:
        recorder: Where records go, and which steps to record.
        layer: The layer name written into the records.
        original: The processor this one replaces.
    """

    def __init__(self, recorder: AttentionRecorder, layer: str, original: Any) -> None:
        self.recorder = recorder
        self.layer = layer
        self.original = original
        # AttnProcessor2_0 applies the optional per-head query/key norms (qk_norm); AttnProcessor does not.
        self._qk_norm = not isinstance(original, AttnProcessor)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.recorder.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            query_hw: tuple[int, int] | None = (height, width)
        else:
            side = math.isqrt(hidden_states.shape[1])
            query_hw = (side, side) if side * side == hidden_states.shape[1] else None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if self._qk_norm and attn.norm_q is not None:
            query = attn.norm_q(query)
        if self._qk_norm and attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = attn.get_attention_scores(query, key, attention_mask)
        heads_out = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(heads_out)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        self._record(attn.heads, probs, heads_out, hidden_states, query_hw, is_cross)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(
        self,
        heads: int,
        probs: torch.Tensor,
        heads_out: torch.Tensor,
        output: torch.Tensor,
        query_hw: tuple[int, int] | None,
        is_cross: bool,
    ) -> None:
        batch = probs.shape[0] // heads
        keep = slice(-self.recorder.keep_last, None) if self.recorder.keep_last else slice(None)
        probs = probs.detach().float().reshape(batch, heads, *probs.shape[1:])[keep]
        head_norm = heads_out.detach().float().norm(dim=-1).mean(dim=-1).reshape(batch, heads)[keep]
        out_norm = output.detach().float().norm(dim=-1).mean(dim=-1)[keep]
        self.recorder.add(
            AttentionRecord(
                layer=self.layer,
                step=self.recorder.step,
                probs=probs.cpu(),
                query_hw=query_hw,
                is_cross=is_cross,
                head_output_norm=head_norm.cpu(),
                output_norm=out_norm.cpu(),
            )
        )


def attention_statistics(probs: torch.Tensor, top_fraction: float = 0.1) -> dict[str, torch.Tensor]:
    """Per-head statistics of attention probabilities ``(B, heads, queries, keys)``, averaged over batch and queries.

    Returns:
        ``entropy``: mean of ``-sum_k p log p``, in ``[0, log(keys)]`` (0: one key; ``log(keys)``:
        uniform); ``sparsity``: mean probability mass on the top ``ceil(top_fraction * keys)``
        keys, in ``[top / keys, 1]`` (the lower end: uniform attention). Each is ``(heads,)``.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction={top_fraction!r} must be in (0, 1].")
    probs = probs.float()
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)
    top = max(1, math.ceil(top_fraction * probs.shape[-1]))
    sparsity = probs.topk(top, dim=-1).values.sum(dim=-1)
    return {"entropy": entropy.mean(dim=(0, 2)), "sparsity": sparsity.mean(dim=(0, 2))}
