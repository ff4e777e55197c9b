"""NSAM memory levels: specs, states, and the hooks that put them into the backbone.

A level is a `LevelSpec` (name, update period, rule, layers, shape, rates); adding a level is
adding a spec to `LevelsConfig`. Two update rules exist:

- "associative" (the fast level): per selected layer a linear associative memory M (R, R),
  written every `period_tokens` tokens by gradient descent on ‖M k − v‖² (delta rule) with
  momentum (surprise) and decay (forgetting). Keys, values, queries and the rates η_t, α_t come
  from learned projections of the hidden state (`FastMemory`). Its read enters the residual
  stream through a gate that starts closed.
- "lora" (medium and user levels): low-rank deltas on the MLP down-projections of selected
  layers, B zero-initialised; updated by the next-token loss through an Adam whose moments
  live in the state.

States are frozen dataclasses of tensors; an update returns a new state, nothing is mutated.
Axis letters: L selected layers, R memory/adapter rank, F MLP width, D model width, C chunk.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import PackedLayout


@dataclass(frozen=True)
class LevelSpec:
    name: str
    rule: str  # "associative" | "lora"
    period_tokens: int  # update every this many tokens (0: only at explicit calls, e.g. end of turn)
    layers: tuple[int, ...]
    rank: int
    lr: float = 1e-3
    steps: int = 1  # optimizer steps per update ("lora")
    max_update_norm: float = 10.0  # guard: larger updates are rejected
    scale: float = 1.0  # "lora": output scale of the delta

    def state_key(self) -> str:
        """What a stored state of this level means (its shape and how it is applied), not how it
        learns: tuning rates, steps or bounds keeps every user's stored memory readable."""
        key = f"{self.name} {self.rule} layers={list(self.layers)} rank={self.rank} scale={self.scale}"
        # A fast state is written through trained projections, which depend on its period and rate.
        return key + (f" period={self.period_tokens} lr={self.lr}" if self.rule == "associative" else "")


@dataclass(frozen=True)
class LevelsConfig:
    levels: tuple[LevelSpec, ...]

    def get(self, name: str) -> LevelSpec:
        for spec in self.levels:
            if spec.name == name:
                return spec
        raise KeyError(f"no level named {name!r}")

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.levels)


def default_levels(n_layers: int) -> LevelsConfig:
    """fast: associative memory in a third of the layers, every 32 tokens; medium and user:
    rank-16 LoRA on every layer's MLP down-projection (medium at the end of each turn)."""
    every_third = tuple(range(1, n_layers, 3))
    all_layers = tuple(range(n_layers))
    return LevelsConfig((
        # The trained memory's writes over a 1,000-token prompt measure ~700 in norm: the bound
        # is there to catch blow-ups, not ordinary turns.
        LevelSpec("fast", "associative", 32, every_third, rank=32, lr=1.0, max_update_norm=1e4),
        # The per-turn rehearsal (steps, rate) is `learning.turn.TurnConfig`; `lr`/`steps` are the
        # gentle next-token step of a turn with nothing to note and of a document's chunk.
        LevelSpec("medium", "lora", 0, all_layers, rank=16, lr=3e-4, steps=1, max_update_norm=25.0),
        LevelSpec("user", "lora", 0, all_layers, rank=16, lr=3e-3, steps=30, max_update_norm=100.0),
    ))


# -- states -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraState:
    """Low-rank MLP deltas plus their Adam moments (the optimizer is a memory too, but a short
    one: stored states keep A and B only, and an update read from bytes restarts its moments)."""

    a: Tensor  # (L, R, F)
    b: Tensor  # (L, D, R), zero at init
    m_a: Tensor
    v_a: Tensor
    m_b: Tensor
    v_b: Tensor
    step: Tensor  # () int64: optimizer steps the level has taken in all
    # () int64: the step at which the moments were last zero (Adam's bias correction counts from it)
    moments_from: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    @classmethod
    def zeros(cls, spec: LevelSpec, hidden_dim: int, dim: int, seed: int) -> "LoraState":
        g = torch.Generator().manual_seed(seed)
        n = len(spec.layers)
        a = torch.randn(n, spec.rank, hidden_dim, generator=g) / hidden_dim**0.5
        b = torch.zeros(n, dim, spec.rank)
        return cls(a, b, torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b),
                   torch.zeros_like(b), torch.zeros((), dtype=torch.int64))

    def without_moments(self) -> "LoraState":
        """The same weights with Adam restarted: zero moments from this step on."""
        zeros_a, zeros_b = torch.zeros_like(self.a), torch.zeros_like(self.b)
        return LoraState(self.a, self.b, zeros_a, zeros_a, zeros_b, zeros_b, self.step, self.step)

    @property
    def is_empty(self) -> bool:
        """B = 0 (a level nothing was learnt into yet): its delta B @ A is exactly zero."""
        return not bool(self.b.any())

    def weight_norm(self) -> float:
        # The delta is B @ A; its Frobenius norm summed over layers is what changes the model.
        return float(torch.linalg.matrix_norm(self.b @ self.a).norm())


@dataclass(frozen=True)
class AssociativeState:
    """Fast-level memory per selected layer, plus the tokens of the chunk not yet written."""

    memory: Tensor  # (L, R, R)
    momentum: Tensor  # (L, R, R)
    pending_k: Tensor  # (L, C, R)
    pending_v: Tensor  # (L, C, R)
    pending_eta: Tensor  # (L, C)
    pending_alpha: Tensor  # (L, C)
    pending: Tensor  # () int64: tokens of the current chunk already seen
    taken: Tensor  # () int64: tokens the level has taken in this session (written or pending)

    @classmethod
    def zeros(cls, spec: LevelSpec, device: torch.device | str = "cpu") -> "AssociativeState":
        n, r, c = len(spec.layers), spec.rank, spec.period_tokens
        z = lambda *shape: torch.zeros(*shape, device=device)  # noqa: E731
        return cls(z(n, r, r), z(n, r, r), z(n, c, r), z(n, c, r), z(n, c), z(n, c),
                   torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64))

    def weight_norm(self) -> float:
        return float(self.memory.norm())


LevelState = LoraState | AssociativeState


def state_tensors(state: LevelState) -> dict[str, Tensor]:
    return {f.name: getattr(state, f.name) for f in fields(state)}


def state_from_tensors(rule: str, tensors: dict[str, Tensor]) -> LevelState:
    cls = LoraState if rule == "lora" else AssociativeState
    return cls(**{f.name: tensors[f.name] for f in fields(cls)  # KeyError: a required tensor is missing
                  if f.name in tensors or (f.default is MISSING and f.default_factory is MISSING)})


def new_state(spec: LevelSpec, hidden_dim: int, dim: int, seed: int = 0) -> LevelState:
    if spec.rule == "lora":
        return LoraState.zeros(spec, hidden_dim, dim, seed)
    if spec.rule == "associative":
        return AssociativeState.zeros(spec)
    raise ValueError(f"unknown update rule {spec.rule!r}")


# -- learned parts of the fast level (meta-trained in the outer loop) -------------------------
class FastMemory(nn.Module):
    """Projections that make the fast level self-referential: keys, values, queries and the
    rates (η_t learning rate, α_t decay) are functions of the hidden state."""

    def __init__(self, spec: LevelSpec, dim: int):
        super().__init__()
        n, r = len(spec.layers), spec.rank
        self.spec = spec
        self.w_k = nn.Parameter(torch.randn(n, dim, r) / dim**0.5)
        self.w_v = nn.Parameter(torch.randn(n, dim, r) / dim**0.5)
        self.w_q = nn.Parameter(torch.randn(n, dim, r) / dim**0.5)
        self.w_o = nn.Parameter(torch.randn(n, r, dim) / r**0.5)
        self.w_eta = nn.Parameter(torch.zeros(n, dim))
        self.b_eta = nn.Parameter(torch.full((n,), -2.0))
        self.w_alpha = nn.Parameter(torch.zeros(n, dim))
        self.b_alpha = nn.Parameter(torch.full((n,), -5.0))
        self.momentum = nn.Parameter(torch.full((n,), 0.5))  # β, squashed by sigmoid at use
        self.gate = nn.Parameter(torch.zeros(n))  # tanh(0) = 0: the read starts closed
        self.lr_scale = 1.0  # 0 freezes the level: recovers the backbone exactly
        # How much stronger the read gets once all the level holds has left the attention window
        # (linear in the share that has left). While the text is still in view the memory only
        # repeats it, and a strong read there garbles chat; once it is gone the memory is the
        # only path to it, which is what the outer loop trained the read for.
        self.evicted_read_boost = 1.0
        # How much stronger the level reads text still in view while it reads a document (a
        # cache-free pass over a long text, chunk by chunk) than in chat: a strong read sharpens
        # the reading of prose, but in chat it makes replies echo what the prompt holds.
        self.document_read_boost = 1.0

    def compat_key(self) -> str:
        """What trained parameters depend on (not guard bounds): saved with them, checked on load."""
        s = self.spec
        return f"layers={list(s.layers)} rank={s.rank} period={s.period_tokens} lr={s.lr}"

    @torch.no_grad()
    def scale_read(self, factor: float) -> None:
        """Scale the read gates' output (tanh(gate)) by `factor`, in place."""
        self.gate.copy_(torch.atanh(torch.tanh(self.gate) * factor))

    def project(self, i: int, x: Tensor) -> Tensor:
        """x (T, D) -> features (T, 3R + 2): q, k, v, η, α of each token, from one matmul."""
        r = self.spec.rank
        w = torch.cat([self.w_q[i], self.w_k[i], self.w_v[i], self.w_eta[i][:, None], self.w_alpha[i][:, None]], 1)
        f = x.float() @ w
        q = F.normalize(f[:, :r], dim=-1)
        k = F.normalize(f[:, r:2 * r], dim=-1)
        eta = torch.sigmoid(f[:, 3 * r] + self.b_eta[i]) * self.spec.lr * self.lr_scale
        alpha = torch.sigmoid(f[:, 3 * r + 1] + self.b_alpha[i]) * float(self.lr_scale > 0)
        return torch.cat([q, k, f[:, 2 * r:3 * r], eta[:, None], alpha[:, None]], 1)

    def read(self, i: int, reads: Tensor) -> Tensor:
        """M q for some tokens (.., R) -> their gated contribution to the residual (.., D)."""
        return torch.tanh(self.gate[i]) * (reads @ self.w_o[i])


def _write_chunk(memory: Tensor, momentum: Tensor, k: Tensor, v: Tensor, eta: Tensor, alpha: Tensor,
                 beta: Tensor) -> tuple[Tensor, Tensor]:
    """One delta-rule step over a full chunk, all tokens at once. k, v (.., C, R), eta, alpha
    (.., C); leading axes (if any) are sequences written side by side."""
    error = k @ memory.transpose(-1, -2) - v  # (.., C, R): M k_t − v_t
    grad = (eta[..., None] * error).transpose(-1, -2) @ k / k.shape[-2]  # ∇ of Σ η_t ‖M k_t − v_t‖² / 2C
    momentum = beta * momentum - grad
    memory = (1 - alpha.mean(-1))[..., None, None] * memory + momentum
    return memory, momentum


def _walk_chunks(params: "FastMemory", i: int, feats: Tensor, memory: Tensor, momentum: Tensor,
                 open_chunk: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """B sequences at the same chunk offset, layer slot i: projected tokens feats (B, T, 3R + 2)
    after their open chunks (B, n, 3R + 2) -> reads (B, T, R) (each token reads the memory as of
    its chunk's start), and memory, momentum and open chunks after writing every chunk that
    fills, with the surprise (B,) of each write."""
    r, c = params.spec.rank, params.spec.period_tokens
    reads, surprise, t0 = [], [], 0
    while t0 < feats.shape[1]:
        n = min(c - open_chunk.shape[1], feats.shape[1] - t0)
        part = feats[:, t0:t0 + n]
        reads.append(part[..., :r] @ memory.transpose(1, 2))
        open_chunk, t0 = torch.cat([open_chunk, part], 1), t0 + n
        if open_chunk.shape[1] == c:
            k, v = open_chunk[..., r:2 * r], open_chunk[..., 2 * r:3 * r]
            surprise.append((k @ memory.transpose(1, 2) - v).pow(2).sum(-1).mean(-1).detach())
            memory, momentum = _write_chunk(memory, momentum, k, v, open_chunk[..., 3 * r],
                                            open_chunk[..., 3 * r + 1], torch.sigmoid(params.momentum[i]))
            open_chunk = open_chunk[:, :0]
    return torch.cat(reads, 1) if len(reads) > 1 else reads[0], memory, momentum, open_chunk, surprise


class FastLevelRunner:
    """Reads and writes the fast level of one sequence inside a forward pass.

    The chunk grid is absolute (positions 0, C, 2C, …), so a sequence processed in pieces
    writes exactly as one long pass does; tokens read the memory as of their chunk's start.
    Tokens of the open chunk wait in `open_chunk` (per layer, as projected feature rows).
    """

    def __init__(self, params: FastMemory, state: AssociativeState, read_only: int = 0,
                 in_context: int | None = None, document: bool = False):
        """`read_only`: the first tokens this runner sees are read, not written (a chat prompt's
        history, which the turns before already wrote). `in_context`: how many of the tokens the
        level took in before are in this pass's attention context (None: all of them); the rest
        have left the window, and the read is boosted by their share (`evicted_read_boost`).
        `document`: the tokens are a document's, read with what is in view at `document_read_boost`."""
        self.params = params
        # History in view counts as taken in even where a template token (an end of turn) never
        # went through the level, so a chat that drops nothing has nothing evicted.
        in_view = int(state.taken) if in_context is None else max(in_context, 0)
        self.taken_before = max(int(state.taken), in_view)
        evicted = 1 - in_view / self.taken_before if self.taken_before else 0.0
        in_view_boost = params.document_read_boost if document else 1.0
        self.read_boost = in_view_boost + (params.evicted_read_boost - in_view_boost) * evicted
        self.c, self.r = params.spec.period_tokens, params.spec.rank
        self.memory = list(state.memory.unbind(0))
        self.momentum = list(state.momentum.unbind(0))
        n = int(state.pending)
        self.open_chunk: list[Tensor] = [
            torch.cat([state.pending_k.new_zeros(n, self.r), state.pending_k[i, :n], state.pending_v[i, :n],
                       state.pending_eta[i, :n, None], state.pending_alpha[i, :n, None]], 1)
            for i in range(len(self.memory))]
        self.read_only = [read_only] * len(self.memory)
        self.taken = 0  # tokens taken in by this runner (every layer slot sees the same ones)
        self._surprise: list[Tensor] = []  # per written chunk; read as floats once (no sync per chunk)

    @property
    def surprise(self) -> list[float]:
        """Mean ‖M k − v‖² of each chunk before its write."""
        return torch.stack(self._surprise).flatten().tolist() if self._surprise else []

    def step(self, i: int, x: Tensor) -> Tensor:
        """x (T, D) consecutive tokens of this sequence at layer slot i -> read (T, D)."""
        return self.params.read(i, self.absorb(i, self.params.project(i, x)) * self.read_boost).to(x.dtype)

    def absorb(self, i: int, feats: Tensor) -> Tensor:
        """Projected tokens (T, 3R + 2) -> their memory reads (T, R); writes each chunk as it fills."""
        t0 = min(self.read_only[i], feats.shape[0])
        self.read_only[i] -= t0
        self.taken += (feats.shape[0] - t0) * (i == 0)
        if t0 == feats.shape[0] or self.open_chunk[i].shape[0] + feats.shape[0] - t0 < self.c:
            # Nothing fills a chunk (a decode step, mostly): read, and let the new tokens wait.
            self.open_chunk[i] = torch.cat([self.open_chunk[i], feats[t0:]])
            return feats[:, :self.r] @ self.memory[i].T
        reads = [feats[:t0, :self.r] @ self.memory[i].T] if t0 else []
        written, memory, momentum, open_chunk, surprise = _walk_chunks(
            self.params, i, feats[None, t0:], self.memory[i][None], self.momentum[i][None], self.open_chunk[i][None])
        self._keep(i, memory[0], momentum[0], open_chunk[0], [s[0] for s in surprise])
        return torch.cat(reads + [written[0]])

    def _keep(self, i: int, memory: Tensor, momentum: Tensor, open_chunk: Tensor, surprise: list[Tensor]) -> None:
        self.memory[i], self.momentum[i], self.open_chunk[i] = memory, momentum, open_chunk
        self._surprise += surprise

    @staticmethod
    def step_together(runners: list["FastLevelRunner"], i: int, x: Tensor) -> Tensor:
        """`step` for B sequences at the same chunk offset, x (B, T, D) -> reads (B, T, D): one
        projection, batched reads and writes (the training passes of the outer loop)."""
        params = runners[0].params
        offset = runners[0].open_chunk[i].shape[0]
        if any(run.open_chunk[i].shape[0] != offset or run.params is not params or run.read_only[i]
               for run in runners):
            raise ValueError("step_together needs writing runners at the same chunk offset with the same parameters")
        b, t, _ = x.shape
        feats = params.project(i, x.reshape(b * t, -1)).view(b, t, -1)
        reads, memory, momentum, open_chunk, surprise = _walk_chunks(
            params, i, feats, torch.stack([run.memory[i] for run in runners]),
            torch.stack([run.momentum[i] for run in runners]), torch.stack([run.open_chunk[i] for run in runners]))
        for j, run in enumerate(runners):
            run._keep(i, memory[j], momentum[j], open_chunk[j], [s[j] for s in surprise])
            run.taken += t * (i == 0)
        boost = torch.tensor([run.read_boost for run in runners], device=reads.device)
        return params.read(i, reads * boost[:, None, None]).to(x.dtype)

    def state(self) -> AssociativeState:
        r, c = self.r, self.c
        padded = torch.stack([F.pad(f.detach(), (0, 0, 0, c - f.shape[0])) for f in self.open_chunk])  # (L, C, 3R+2)
        return AssociativeState(torch.stack(self.memory), torch.stack(self.momentum), padded[:, :, r:2 * r],
                                padded[:, :, 2 * r:3 * r], padded[:, :, 3 * r], padded[:, :, 3 * r + 1],
                                torch.tensor(self.open_chunk[0].shape[0], dtype=torch.int64),
                                torch.tensor(self.taken_before + self.taken, dtype=torch.int64))


# -- hooks: the levels of several sequences inside one forward pass ---------------------------
@dataclass
class BatchLevels:
    """`LevelHooks` for a batch: per sequence, summed LoRA deltas and a fast-level runner.

    `lora` holds, per sequence, the (A, B) stacks of every active LoRA level concatenated on
    the rank axis (user ⊕ medium), so one batched matmul applies all of them.
    Rows are sequences in decode; in a packed prefill `layout` says where each one sits.
    """

    lora_layers: dict[int, int]  # backbone layer -> row in the stacked A/B
    lora_a: Tensor | None  # (N, L, R', F)
    lora_b: Tensor | None  # (N, L, D, R')
    fast_layers: dict[int, int]
    fast: list[FastLevelRunner] | None
    layout: PackedLayout | None = None
    scale: float = 1.0
    _slices: list[slice] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout is not None:
            ends = torch.tensor(self.layout.lengths).cumsum(0).tolist()
            self._slices = [slice(e - n, e) for e, n in zip(ends, self.layout.lengths)]

    def mlp_delta(self, layer: int, h: Tensor) -> Tensor | None:
        row = self.lora_layers.get(layer)
        if row is None or self.lora_a is None:
            return None
        a = self.lora_a[:, row].to(h.dtype)  # (N, R', F)
        b = self.lora_b[:, row].to(h.dtype)  # (N, D, R')
        if self.layout is None:  # decode: h (N, 1, F)
            return torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2)) * self.scale
        parts = [(h[0, s] @ a[i].T) @ b[i].T for i, s in enumerate(self._slices)]
        return torch.cat(parts)[None] * self.scale

    def after_attention(self, layer: int, x: Tensor) -> Tensor:
        slot = self.fast_layers.get(layer)
        if slot is None or self.fast is None:
            return x
        if self.layout is None and x.shape[1] == 1:  # decode: one token per row, projected together
            params = next((r.params for r in self.fast if isinstance(r, FastLevelRunner)), None)
            if params is None:
                return x
            feats = params.project(slot, x[:, 0])  # (B, 3R + 2)
            reads = torch.cat([r.absorb(slot, feats[b:b + 1]) * r.read_boost if isinstance(r, FastLevelRunner)
                               else x.new_zeros(1, params.spec.rank, dtype=torch.float32)
                               for b, r in enumerate(self.fast)])
            return x + params.read(slot, reads).to(x.dtype)[:, None]
        if self.layout is None:  # a cache-free (B, T) pass
            return x + FastLevelRunner.step_together(self.fast, slot, x)
        reads = [runner.step(slot, x[0, s]) for runner, s in zip(self.fast, self._slices)]
        return x + torch.cat(reads)[None]


def stack_lora(states: list[list[LoraState]], specs: list[LevelSpec]
               ) -> tuple[dict[int, int], Tensor | None, Tensor | None, float]:
    """Per sequence, concatenate the LoRA levels (same layers and scale required) on the rank
    axis; then stack sequences. Returns (layer->row, A (N, L, R', F), B (N, L, D, R'), scale)."""
    if not specs:
        return {}, None, None, 1.0
    layers = specs[0].layers
    if any(s.layers != layers or s.scale != specs[0].scale for s in specs):
        raise ValueError("LoRA levels applied together must share layers and scale")
    a = torch.stack([torch.cat([st.a for st in seq], dim=1) for seq in states])
    b = torch.stack([torch.cat([st.b for st in seq], dim=2) for seq in states])
    return {layer: i for i, layer in enumerate(layers)}, a, b, specs[0].scale
