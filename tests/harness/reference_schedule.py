"""An independent, slow float64 implementation of what a chain of DiTFastAttn nodes computes.

Written apart from the pack (it imports none of it): a chain is a list of plain dicts, the pack
builds it with its own nodes (`harness.chains.patched_with_nodes`) and this module carries it out
through a different host hook (the model function wrapper) with dense float64 attention
(`reference_model`). Tests sample both and compare, and compare which techniques acted
(`techniques_acted`). The semantics, as the README states them:

- a model evaluation belongs to the schedule step whose sigma interval holds it; the n-th
  evaluation of a conditioning in a step (a second-order sampler's second call, an extension's
  extra forward, a context window) only shares caches with the n-th evaluations of other steps;
- techniques act on self-attention over image tokens (joint or image-only calls) of forwards
  whose block replacements are the model's own; everything else is the host's attention;
- a node covers the steps whose starting sigma s lies in its start / end percent read as noise
  levels: s <= percent_to_sigma(start) and s > percent_to_sigma(end) of the model's sampling
  (equal within float rounding counts as equal), as core ComfyUI's EasyCache reads a range;
  `refresh_every` and `compute_every` count the covered steps of this sampler's run from its first;
- per (step, layer): the last step-sharing node covering it reuses the layer's last computed
  output between its computed steps; else the last window node covering it computes its full
  steps in full and the steps between as window + (full - window) of the last full step (made
  for the window of the next step that computes); CFG sharing (any node covering it) computes
  the conditional chunks and copies the first one with the same model input to each
  unconditional chunk, under ComfyUI's CFG guider only;
- a cache that is missing or made for another window or shape means a full computation;
  text padding masks (hard, hiding only text keys, the same ones from every query and head) hide
  their keys from every query, windows included; a call with any other mask computes in full
  (and caches no residual), as the host computes it.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field

import torch

from .models import SPECS, joint_text_tokens

# models whose attention ignores the override: their attention function, given the options per forward
UNROUTED = {"pixart": "comfy.ldm.pixart.blocks", "hunyuan_dit": "comfy.ldm.hydit.attn_layers"}


def reference_model(model, chain: list[dict], arch: str, cfg_guider: bool = True):
    """A clone of `model` whose attention follows `chain` as specified above, in float64."""
    clone = model.clone()
    reference = _Reference(chain, arch, cfg_guider, _replacements(clone.model_options.get("transformer_options", {})),
                           clone.get_model_object("model_sampling").percent_to_sigma)
    clone.set_model_unet_function_wrapper(reference.forward)
    return clone


def techniques_acted(reference) -> set[str]:
    """What changed some attention call in the runs of a `reference_model` clone so far: "window"
    (a window, with its residual if it has one), "step" (a reused output), "cfg" (a copied one)."""
    return set(reference.model_options["model_function_wrapper"].__self__.acted)


def _layers(text: str) -> set[int] | None:
    if not text.strip():
        return None
    found: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found


@dataclass(frozen=True)
class _Levels:
    """One sampler's run: the sigma each step starts from, and the model's percent -> sigma."""

    sigmas: tuple[float, ...]
    percent_to_sigma: object

    @property
    def total(self) -> int:
        return len(self.sigmas) - 1

    def covered(self, spec: dict) -> list[int]:
        """The run's steps inside the node's noise range, in order."""
        high = float(self.percent_to_sigma(spec.get("start", 0.0)))
        low = float(self.percent_to_sigma(spec.get("end", 1.0)))
        return [step for step, s in enumerate(self.sigmas[:-1])
                if (s < high or math.isclose(s, high, rel_tol=1e-5, abs_tol=1e-8))
                and s > low and not math.isclose(s, low, rel_tol=1e-5, abs_tol=1e-8)]


def _covers(spec: dict, step: int, levels: _Levels, layer: int) -> bool:
    layers = _layers(spec.get("layers", ""))
    return step in levels.covered(spec) and (layers is None or layer in layers)


@dataclass(frozen=True)
class _Choice:
    compute: str  # "full", "window", "reuse"
    cfg: bool
    window: dict | None = None


def _choose(chain: list[dict], step: int, levels: _Levels, layer: int) -> _Choice:
    covering = [spec for spec in chain if _covers(spec, step, levels, layer)]
    cfg = any(spec["technique"] == "cfg" for spec in covering)
    sharing = [spec for spec in covering if spec["technique"] == "step"]
    if sharing:
        spec = sharing[-1]
        if levels.covered(spec).index(step) % spec.get("compute_every", 2):
            return _Choice("reuse", cfg)
    windows = [spec for spec in covering if spec["technique"] == "window"]
    if not windows:
        return _Choice("full", cfg)
    spec = windows[-1]
    if levels.covered(spec).index(step) % spec.get("refresh_every", 2) == 0:
        return _Choice("full", cfg)
    return _Choice("window", cfg, spec)


def _next_window(chain: list[dict], step: int, levels: _Levels, layer: int) -> dict | None:
    """The window (with residual) of the layer's next step that computes, if it uses one."""
    for later in range(step + 1, levels.total):
        choice = _choose(chain, later, levels, layer)
        if choice.compute != "reuse":
            return choice.window if choice.window is not None and choice.window.get("residual", True) else None
    return None


def _allowed(spec: dict, text_len: int, grid: tuple[int, ...], text_first: bool, mask_keep: torch.Tensor) -> torch.Tensor:
    """[N, N] keys each query may see: the window between image tokens, text rows and columns
    whole, and (for every query) only the keys the host's mask keeps."""
    image_len = math.prod(grid)
    n = text_len + image_len
    start = text_len if text_first else 0
    pos = torch.arange(n)
    is_image = (pos >= start) & (pos < start + image_len)
    index = (pos - start).clamp(0, image_len - 1)
    shape = spec.get("shape", "band")
    fraction, tokens = spec.get("fraction", 0.125), spec.get("tokens", 0)
    if shape == "band":
        radius = tokens or max(1, round(fraction * image_len))
        near = (index[:, None] - index[None, :]).abs() <= radius
    else:
        radius = tokens or max(1, round(fraction * max(grid[-2:])))
        temporal = max(0, round(fraction * grid[0])) if len(grid) == 3 else 0
        width, height = grid[-1], grid[-2]
        x, y, t = index % width, (index // width) % height, index // (width * height)
        dx, dy, dt = (a[:, None] - a[None, :] for a in (x, y, t))
        near = (dx * dx + dy * dy < radius * radius) if shape == "circle" else (dx.abs() <= radius) & (dy.abs() <= radius)
        near = near & (dt.abs() <= temporal)
    window = torch.where(is_image[:, None] & is_image[None, :], near, torch.ones_like(near))
    return window & mask_keep


def _attend(q, k, v, scale, allowed=None, bias=None):
    """Dense attention over the keys `allowed` sees, the host's additive mask `bias` added."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


HIDDEN = -1.0e4  # an additive mask entry at or below this hides its key


def _mask_bias(mask, batch: int, n: int) -> torch.Tensor | None:
    """The host's mask as an additive float64 [B, 1 or H, N, N] bias (a bool mask: 0 kept, -inf hidden)."""
    if mask is None:
        return None
    while mask.ndim < 4:
        mask = mask.unsqueeze(0 if mask.ndim == 2 else 1)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask.cpu(), float("-inf"))
    return mask.double().expand(batch, mask.shape[1], n, n)


def _padding_keep(bias: torch.Tensor | None, batch: int, n: int, image: slice) -> torch.Tensor | None:
    """[B, 1, 1, N] keys kept when `bias` is a text padding mask (every entry 0 or hidden, the same
    for every query and head, no image key hidden); None for any other mask."""
    if bias is None:
        return torch.ones(batch, 1, 1, n, dtype=torch.bool)
    kept, hidden = bias == 0, bias <= HIDDEN
    first = kept[:, :1, :1, :]
    if not bool((kept | hidden).all()) or not bool((kept == first).all()) or not bool(first[..., image].all()):
        return None
    return first


def _replacements(transformer_options: dict) -> frozenset:
    return frozenset((kind, key) for kind, blocks in transformer_options.get("patches_replace", {}).items()
                     for key in blocks)


@dataclass
class _Reference:
    chain: list[dict]
    arch: str
    cfg_guider: bool
    own_replacements: frozenset
    percent_to_sigma: object
    acted: set = field(default_factory=set)  # the techniques that changed some call: "window", "step", "cfg"
    outputs: dict = field(default_factory=dict)  # (layer, chunk) -> (step, output)
    residuals: dict = field(default_factory=dict)  # (layer, chunk) -> (step, window's mask, residual)
    conditional: dict = field(default_factory=dict)  # (layer, step, evaluation, frames) -> (input, output)
    evaluations: dict = field(default_factory=dict)

    def forward(self, apply_model, args: dict) -> torch.Tensor:
        x, c = args["input"], dict(args["c"])
        options = c["transformer_options"]
        sigmas = [float(s) for s in options["sample_sigmas"]]
        total = len(sigmas) - 1
        levels = _Levels(tuple(sigmas), self.percent_to_sigma)
        sigma = float(options["sigmas"].flatten()[0])
        reached = sum(1 for s in sigmas[:-1] if s >= sigma or math.isclose(s, sigma, rel_tol=1e-5))
        step = min(max(reached - 1, 0), total - 1)
        roles = list(args["cond_or_uncond"])
        window = options.get("context_window")
        frames = tuple(window.index_list) if window is not None else ()
        chunks = []
        for place, uuid in enumerate(options.get("uuids", roles)):
            self.evaluations[(step, uuid, frames)] = self.evaluations.get((step, uuid, frames), -1) + 1
            chunks.append((uuid, frames, self.evaluations[(step, uuid, frames)], place))
        patch = SPECS[self.arch].patch
        grid = tuple(-(-size // p) for size, p in zip(x.shape[-len(patch):], patch, strict=False))
        forward = _Forward(self, step, levels, roles, chunks, x.chunk(len(roles)), grid, joint_text_tokens(self.arch, c),
                           _replacements(options) != self.own_replacements)
        c["transformer_options"] = {**options, "optimized_attention_override": forward}
        if self.arch not in UNROUTED:
            return apply_model(x, args["timestep"], **c)
        blocks = importlib.import_module(UNROUTED[self.arch])  # its attention ignores the override:
        original = blocks.optimized_attention  # give it the transformer options for this forward
        blocks.optimized_attention = functools.partial(original, transformer_options=c["transformer_options"])
        try:
            return apply_model(x, args["timestep"], **c)
        finally:
            blocks.optimized_attention = original


@dataclass
class _Forward:
    ref: _Reference
    step: int
    levels: _Levels
    roles: list[int]
    chunks: list[tuple]
    inputs: tuple
    grid: tuple[int, ...]
    text_len: int
    altered: bool
    layer: int = 0

    def __call__(self, func, q, k, v, heads, mask=None, **kwargs):
        layer = self.layer
        self.layer += 1
        image_len = math.prod(self.grid)
        n = q.shape[2] if kwargs.get("skip_reshape") else q.shape[1]
        joint = self.text_len and n == self.text_len + image_len
        self_attention = (k.shape[2] if kwargs.get("skip_reshape") else k.shape[1]) == n
        placed = joint or (n == image_len and n != self.text_len)
        if self.altered or not self_attention or not placed:
            return func(q, k, v, heads, mask=mask, **kwargs)
        text_len = self.text_len if joint else 0
        qh, kh, vh = (self._heads_first(t, heads, kwargs) for t in (q, k, v))
        bias = _mask_bias(mask, q.shape[0], n)
        image_start = text_len if SPECS[self.ref.arch].text_first else 0
        keep = _padding_keep(bias, q.shape[0], n, slice(image_start, image_start + image_len))  # None: not a padding mask
        choice = _choose(self.ref.chain, self.step, self.levels, layer)
        size = q.shape[0] // len(self.chunks)
        rows = [slice(i * size, (i + 1) * size) for i in range(len(self.chunks))]
        stored = [self.ref.outputs.get((layer, chunk[:3])) for chunk in self.chunks]
        if choice.compute == "reuse" and all(s is not None and s[0] < self.step and s[1].shape == qh[r].shape
                                             for s, r in zip(stored, rows, strict=True)):
            self.ref.acted.add("step")
            return self._format(torch.cat([s[1] for s in stored]), q.dtype, kwargs)
        sources = {i: self._cfg_source(choice, layer, i, qh[rows[i]].shape) for i in range(len(self.chunks))}
        outs: list = [None] * len(self.chunks)
        for i, source in sources.items():
            if source is None:
                r = rows[i]
                outs[i] = self._compute(choice, layer, i, qh[r], kh[r], vh[r], text_len,
                                        None if bias is None else bias[r], None if keep is None else keep[r])
                key = (layer, self.step, self.chunks[i][2], self.chunks[i][1])
                if choice.cfg and self.roles[i] == 0 and self.ref.cfg_guider and key not in self.ref.conditional:
                    self.ref.conditional[key] = (self.inputs[i], outs[i])
        for i, source in sources.items():
            if source is not None:
                outs[i] = outs[source] if isinstance(source, int) else source
                self.ref.acted.add("cfg")
        if _choose(self.ref.chain, self.step + 1, self.levels, layer).compute == "reuse":
            for chunk, out in zip(self.chunks, outs, strict=True):
                self.ref.outputs[(layer, chunk[:3])] = (self.step, out)
        return self._format(torch.cat(outs), q.dtype, kwargs)

    def _cfg_source(self, choice: _Choice, layer: int, i: int, shape: torch.Size) -> int | torch.Tensor | None:
        """What an unconditional chunk copies: the first conditional chunk of this call with the
        same input, else the conditional output an earlier call of this step made for it."""
        if not (choice.cfg and self.ref.cfg_guider and self.roles[i] == 1):
            return None
        for j, role in enumerate(self.roles):
            if role == 0 and torch.equal(self.inputs[j], self.inputs[i]):
                return j
        earlier = self.ref.conditional.get((layer, self.step, self.chunks[i][2], self.chunks[i][1]))
        if (earlier is not None and earlier[1].shape == shape and earlier[0].shape == self.inputs[i].shape
                and torch.equal(earlier[0], self.inputs[i])):
            return earlier[1]
        return None

    def _compute(self, choice, layer, i, q, k, v, text_len, bias, keep) -> torch.Tensor:
        """One chunk's output: the window (+ residual) where the choice and the mask allow it
        (`keep`: the keys a text padding mask keeps, None for another mask), else in full."""
        scale = q.shape[-1] ** -0.5
        chunk = self.chunks[i][:3]
        text_first = SPECS[self.ref.arch].text_first
        if choice.compute == "window" and keep is not None:
            spec = choice.window
            allowed = _allowed(spec, text_len, self.grid, text_first, keep)
            windowed = _attend(q, k, v, scale, allowed)
            if not spec.get("residual", True):
                self.ref.acted.add("window")
                return windowed
            residual = self.ref.residuals.get((layer, chunk))
            if residual is not None and residual[0] < self.step and torch.equal(residual[1], allowed):
                self.ref.acted.add("window")
                return windowed + residual[2]
        full = _attend(q, k, v, scale, bias=bias)
        later = _next_window(self.ref.chain, self.step, self.levels, layer)
        if later is not None and keep is not None:
            allowed = _allowed(later, text_len, self.grid, text_first, keep)
            self.ref.residuals[(layer, chunk)] = (self.step, allowed, full - _attend(q, k, v, scale, allowed))
        return full

    def _heads_first(self, t, heads, kwargs) -> torch.Tensor:
        t = t.double()
        if kwargs.get("skip_reshape"):
            return t
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def _format(self, out, dtype, kwargs) -> torch.Tensor:
        out = out.to(dtype)
        if kwargs.get("skip_output_reshape"):
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
