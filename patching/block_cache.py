"""Block caching: a transformer block skipped, its output its inputs plus the change the block made
to them when it last ran (as FORA and Delta-DiT reuse a block's features across steps).

A plan cell "block" at (step, layer), on the first attention layer of a block, skips the whole block:
its attention calls, projections and MLP. The change is kept per batch chunk (cache.py) for each stream
the block returns (SD3: context and image tokens), from the block's last computed step. A skipped block
makes no attention call, so the forward's layer numbering advances by the calls the block made when it
last ran (what the run learned the first time); a block never run in this run computes. The pack hooks
each block the adapter lists (adapters.Block) through a ModelPatcher object patch, as branch.py hooks
projections, and asks the attention method, found through the running ForwardPass, what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapters import Block
from .cache import gather_chunks, store_chunks
from .report import BLOCK_CACHE
from .state import ACTIVE, BlockFacts, ForwardPass


@dataclass(frozen=True)
class BlockCall:
    """One call of a hooked block: its streams read from the call's arguments, its result rebuilt."""

    block: Block
    original: Callable
    args: tuple
    kwargs: dict

    def inputs(self) -> list[torch.Tensor | None]:
        return [self.kwargs[name] if name in self.kwargs else self.args[place] if place < len(self.args) else None
                for name, place in self.block.streams]

    def run(self) -> tuple[object, list[torch.Tensor | None]]:
        """The block's own result, and its outputs aligned with the streams."""
        result = self.original(*self.args, **self.kwargs)
        return result, list(result) if isinstance(result, tuple) else [result]


def block_forward(block: Block, original: Callable) -> Callable:
    """The replacement `forward` of one hooked block: the attention method's `run_block(call, forward pass)`
    decides (DiTFastAttn skips or runs it; calibration measures it); outside sampling it runs as is."""

    def forward(*args, **kwargs):
        active = ACTIVE.get()
        method = getattr(active.run.patch.method, "run_block", None) if active is not None else None
        if method is None or active.stand_aside is not None:
            return original(*args, **kwargs)
        return method(BlockCall(block, original, args, kwargs), active)

    forward.fastattn_original = original
    return forward


def computed(call: BlockCall, forward: ForwardPass, changes: bool) -> tuple[object, list[torch.Tensor | None]]:
    """Run the block and learn its facts; with `changes`, also return what it added to each stream (its
    inputs copied first: Flux's blocks add to them in place), None for a stream it returns as None."""
    before = [tensor.clone() if changes and tensor is not None else None for tensor in call.inputs()]
    first, flops = forward.layers, forward.full_flops
    result, outputs = call.run()
    if len(outputs) != len(call.block.streams):  # not the block the adapter describes: never skipped
        return result, []
    forward.run.blocks[call.block.path] = BlockFacts(forward.layers - first, forward.full_flops - flops,
                                                     not isinstance(result, tuple),
                                                     tuple(tensor is None for tensor in outputs))
    found = [None if old is None or new is None or old.shape != new.shape else new - old
             for old, new in zip(before, outputs, strict=True)] if changes else []
    return result, found


def store(forward: ForwardPass, block: Block, changes: list[torch.Tensor | None]) -> None:
    """Keep a computed block's changes per chunk, for a later step that skips it."""
    for stream, change in enumerate(changes):
        if change is not None:
            store_chunks(forward.run, ("block", block.path, stream), forward.chunk_ids, forward.step, change,
                         (tuple(change.shape[1:]),))


def reused(call: BlockCall, forward: ForwardPass) -> object | None:
    """The block's result from its stored change, or None where a stream has none stored for this call
    (the block never ran in this run for these chunks and shape, or ran at this step)."""
    facts = forward.run.blocks.get(call.block.path)
    if facts is None:
        return None
    outputs: list[torch.Tensor | None] = []
    for stream, (tensor, missing) in enumerate(zip(call.inputs(), facts.missing, strict=False)):
        if missing:
            outputs.append(None)
            continue
        change = None if tensor is None else gather_chunks(forward.run, ("block", call.block.path, stream),
                                                           forward.chunk_ids, (tuple(tensor.shape[1:]),), forward.step)
        if change is None or change.shape != tensor.shape:
            return None
        outputs.append(tensor + change.to(tensor.dtype))
    forward.layers += facts.layers
    forward.full_flops += facts.flops
    forward.run.report.count(BLOCK_CACHE, 0, facts.flops)
    return outputs[0] if facts.single else tuple(outputs)
