"""Kernel choices of the LightX2V backend: self-attention chosen per GPU by measurement, and the
INT8 GEMM autotune list sized to the GPU's shared memory.

Attention. Which kernel is fastest depends on the GPU: on an H200, PyTorch's cuDNN attention (bf16,
exact up to bf16 rounding) beats SageAttention 1 (INT8 QK, FP16 PV) by 1.25-1.3x; on an RTX 3060,
bf16 tensor work with fp32 accumulation runs at half the rate of FP16-accumulated work, so
SageAttention is expected to win there. So the backend does not assume: at the first self-attention
call of a shape it times every backend that can run on this GPU (on a prefix of the query rows, the
cost is linear in them) and measures each one's relative L2 error against an fp32 reference on
sampled query rows. The fastest backend whose error is no larger than the baseline's (the kernel
LightX2V itself would run: SageAttention where installed) wins; the baseline always qualifies. The
choice is cached per GPU name and shape in the history database, so a GPU measures once.

The pure parts (which backends a GPU can run, which kernel SageAttention 1.0.6 offers on a compute
capability, the choice rule, the shared-memory arithmetic) take plain values and are tested on
the CPU; the measuring parts take torch as an argument and import nothing at import time.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace, asdict, dataclass, field
from typing import Any, Callable, Iterable, Protocol

log = logging.getLogger(__name__)

# Attention backends, in the order they are measured (the baseline first).
SAGE = "sage_attn2"            # LightX2V's own: SageAttention's INT8-QK kernel
SDPA_CUDNN = "sdpa_cudnn"      # torch SDPA, cuDNN backend (bf16)
SDPA_FLASH = "sdpa_flash"      # torch SDPA, FlashAttention-2 backend (bf16)
SDPA_EFFICIENT = "sdpa_efficient"  # torch SDPA, memory-efficient backend
FLASH_ATTN2 = "flash_attn2"    # the flash_attn package, where installed
FLASH_ATTN3 = "flash_attn3"    # flash_attn_interface (FlashAttention 3, Hopper only), where installed
TORCH_SDPA = "torch_sdpa"      # LightX2V's torch_sdpa: SDPA with PyTorch's own backend pick (the
                               # baseline where SageAttention is not installed)
ALL_ATTENTION = (SAGE, TORCH_SDPA, SDPA_CUDNN, SDPA_FLASH, SDPA_EFFICIENT, FLASH_ATTN2, FLASH_ATTN3)

# LightX2V imports this SageAttention entry point on compute capability 8.9 and 12.0; SageAttention
# 1.0.6 (the version that runs on sm_86 without compiling CUDA) does not export it.
SAGE_SM89_ENTRY = "sageattn_qk_int8_pv_fp16_triton"
SAGE_SM89_CAPABILITIES = ((8, 9), (12, 0))

# Backends that change their inputs: SageAttention subtracts the keys' mean from k in place
# (smooth_k). Harmless in a run, where k is used once, but a measurement calls several kernels on the
# same k, and the run's own call comes after it: measured on 2026-11-30, the first run of a shape gave
# other frames than the next runs, and SageAttention was judged "not repeatable".
MUTATES_KEYS = frozenset({SAGE})

TIMING_QUERY_ROWS = 8192   # rows of q timed per backend (all keys): ~1/4 of a 480p call, ~1/9 at 720p
REFERENCE_ROWS = 128       # query rows the fp32 reference is computed for
TIMING_REPS = 3
NO_BASELINE_TOLERANCE = 0.02


# ------------------------------------------------------------------------------------------------
# Which backends can run here (pure)


def sage_entry_point(capability: tuple[int, int] | None, exports: Iterable[str]) -> str | None:
    """The SageAttention function that works on this GPU: LightX2V's pick where the installed
    SageAttention has it, else 1.0.6's `sageattn` (its Triton kernel runs on sm_80 and newer);
    None where SageAttention is missing or too old for the GPU."""
    names = set(exports)
    if capability is None or capability < (8, 0):
        return None
    if capability in SAGE_SM89_CAPABILITIES and SAGE_SM89_ENTRY in names:
        return SAGE_SM89_ENTRY
    return "sageattn" if "sageattn" in names else None


def available_attention(capability: tuple[int, int] | None, *, sage_exports: Iterable[str] = (),
                        cudnn_sdpa: bool = True, flash_attn: bool = False, flash_attn3: bool = False) -> list[str]:
    """The attention backends worth measuring on a GPU of this compute capability, baseline first.

    cuDNN and flash SDPA need sm_80 or newer (bf16 tensor cores; PyTorch refuses them below);
    FlashAttention 3 is Hopper only (sm_90). The memory-efficient SDPA runs everywhere. A backend
    that still fails at measurement time is dropped there (`measure_attention`)."""
    if capability is None:
        return []
    out = [SAGE] if sage_entry_point(capability, sage_exports) is not None else [TORCH_SDPA]
    ampere = capability >= (8, 0)
    if ampere and cudnn_sdpa:
        out.append(SDPA_CUDNN)
    if ampere:
        out.append(SDPA_FLASH)
    out.append(SDPA_EFFICIENT)
    if ampere and flash_attn:
        out.append(FLASH_ATTN2)
    if capability == (9, 0) and flash_attn3:
        out.append(FLASH_ATTN3)
    return out


# ------------------------------------------------------------------------------------------------
# The choice (pure)


@dataclass(frozen=True)
class Trial:
    backend: str
    seconds: float | None = None   # median of the timed calls on the query prefix
    rel_l2: float | None = None    # ||o - o_ref|| / ||o_ref|| on the sampled rows
    error: str | None = None       # why it could not run here


@dataclass(frozen=True)
class AttentionChoice:
    backend: str
    baseline: str
    shape: str
    gpu: str
    trials: tuple[Trial, ...] = ()
    measured_at: float = 0.0
    source: str = "measured"       # measured | cached | forced, "... on rank 0" where rank 0 chose
    ranks: int = 1                 # the ranks of a sequence-parallel group that run it (RankGroup)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "trials": [asdict(t) for t in self.trials]})

    @classmethod
    def from_json(cls, text: str) -> "AttentionChoice":
        data = json.loads(text)
        data["trials"] = tuple(Trial(**t) for t in data.get("trials", ()))
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        return {"backend": self.backend, "baseline": self.baseline, "shape": self.shape, "gpu": self.gpu,
                "source": self.source, **({"ranks": self.ranks} if self.ranks > 1 else {}),
                "trials": {t.backend: {"ms": None if t.seconds is None else round(t.seconds * 1e3, 3),
                                       "rel_l2": None if t.rel_l2 is None else float(f"{t.rel_l2:.4g}"),
                                       **({"error": t.error} if t.error else {})} for t in self.trials}}


def choose_attention(trials: Iterable[Trial], baseline: str) -> str:
    """The fastest backend that ran and is no less accurate than the baseline. The baseline wins
    ties and stands when nothing qualifies (or when it itself could not be measured, the fastest
    of those that ran is taken only if its error is known)."""
    trials = [t for t in trials if t.error is None and t.seconds is not None]
    base = next((t for t in trials if t.backend == baseline), None)
    if base is None:
        # The baseline could not run (e.g. SageAttention missing): no bar to hold to but its absence;
        # the most accurate measured backend sets it.
        measured = [t for t in trials if t.rel_l2 is not None]
        if not measured:
            return baseline
        # Errors of exact-up-to-bf16 kernels differ in the fourth digit (1.702e-3 against 1.703e-3,
        # measured): within 2 % of the most accurate counts as equally accurate.
        bar = min(t.rel_l2 for t in measured) * (1 + NO_BASELINE_TOLERANCE)
        return min((t for t in measured if t.rel_l2 <= bar), key=lambda t: t.seconds).backend
    bar = base.rel_l2
    best = base
    for t in trials:
        if t is base or t.rel_l2 is None or bar is None or t.rel_l2 > bar:
            continue
        if t.seconds < best.seconds:
            best = t
    return best.backend


# ------------------------------------------------------------------------------------------------
# The cache of choices


class ChoiceStore(Protocol):
    """What the history database offers (pipeline.store.history.History)."""

    def kernel_choice(self, gpu_name: str, key: str) -> str | None: ...

    def record_kernel_choice(self, gpu_name: str, key: str, value: str) -> None: ...


class MemoryStore:
    """A ChoiceStore for one process (bench, tests, an app without history)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], str] = {}

    def kernel_choice(self, gpu_name: str, key: str) -> str | None:
        return self.values.get((gpu_name, key))

    def record_kernel_choice(self, gpu_name: str, key: str, value: str) -> None:
        self.values[(gpu_name, key)] = value


@dataclass(frozen=True)
class RankGroup:
    """The ranks of a sequence-parallel group, which must run one attention kernel: a rank that
    measured on its own head shard could pick another kernel than its peers (another rounding per
    shard, frames unlike one GPU's, and the slowest kernel holding every rank at each all-to-all).
    `broadcast(obj)` returns rank 0's `obj` on every rank; `all_gather(obj)` every rank's, in rank
    order. Both are collective: every rank calls them at the same point."""

    rank: int
    size: int
    broadcast: Callable[[Any], Any]
    all_gather: Callable[[Any], list[Any]]


def rank_group(dist: Any, group: Any = None) -> RankGroup:
    """The RankGroup of a torch.distributed group (None: the default group) whose rank 0 is the
    default group's rank 0 (a GPU worker's small gloo group spans every rank)."""

    def broadcast(obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def all_gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out

    return RankGroup(dist.get_rank(group), dist.get_world_size(group), broadcast, all_gather)


def attention_key(tokens: int, heads: int, head_dim: int, dtype: str, versions: str) -> str:
    """Cache key of one shape; the versions (torch, SageAttention) make an upgrade measure again."""
    return f"attention/{tokens}x{heads}x{head_dim}/{dtype}/{versions}"


def cached_choices(store: ChoiceStore | None, gpu_name: str | None) -> list[dict[str, Any]]:
    """The attention choices measured on this GPU (for the System tab): summaries, newest first."""
    if store is None or not gpu_name or not hasattr(store, "kernel_choices"):
        return []
    out = []
    for key, value in store.kernel_choices(gpu_name):
        try:
            out.append({"key": key, **AttentionChoice.from_json(value).summary()})
        except (ValueError, TypeError, KeyError):
            log.warning("unreadable kernel choice %s on %s", key, gpu_name)
    return out


# ------------------------------------------------------------------------------------------------
# Attention functions: q, k, v [L, H, D] -> [L, H, D]


def attention_functions(torch: Any, sage_fn: Callable[..., Any] | None) -> dict[str, Callable[[Any, Any, Any], Any]]:
    """Callables per backend name. SDPA takes [1, H, L, D] views of the [L, H, D] tensors (no copy)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel([backend]):
                o = F.scaled_dot_product_attention(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                                                   v.unsqueeze(0).transpose(1, 2))
            return o.transpose(1, 2)[0]
        return run

    def sdpa_default(q, k, v):
        o = F.scaled_dot_product_attention(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
                                           v.unsqueeze(0).transpose(1, 2))
        return o.transpose(1, 2)[0]

    fns: dict[str, Callable[[Any, Any, Any], Any]] = {
        TORCH_SDPA: sdpa_default,
        SDPA_CUDNN: sdpa(SDPBackend.CUDNN_ATTENTION),
        SDPA_FLASH: sdpa(SDPBackend.FLASH_ATTENTION),
        SDPA_EFFICIENT: sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    if sage_fn is not None:
        def sage(q, k, v, **options):
            # options: SageAttention's own (smooth_k=False where the compat layer smooths k itself)
            return sage_fn(q.unsqueeze(0).contiguous(), k.unsqueeze(0).contiguous(), v.unsqueeze(0).contiguous(),
                           tensor_layout="NHD", **options)[0]
        fns[SAGE] = sage
    try:
        from flash_attn import flash_attn_func

        fns[FLASH_ATTN2] = lambda q, k, v: flash_attn_func(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]
    except ImportError:
        pass
    try:
        from flash_attn_interface import flash_attn_func as fa3

        def flash3(q, k, v):
            out = fa3(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
            return (out[0] if isinstance(out, tuple) else out)[0]
        fns[FLASH_ATTN3] = flash3
    except ImportError:
        pass
    return fns


# The most GPUs one clip is split over (issue 14: N dividing the 40 heads, at most 8).
MAX_SEQ_RANKS = 8


def split_invariant_head_group(num_heads: int, max_ranks: int = MAX_SEQ_RANKS) -> int:
    """Heads per group for a per-head computation whose torch reduction must not depend on how
    many heads a GPU holds: the local head count of the largest split (1, 2, 4 or 8 GPUs dividing
    `num_heads`), which divides the local head count of every smaller split. 40 heads: 5."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    ranks = max(n for n in (1, 2, 4, 8) if n <= max_ranks and num_heads % n == 0)
    return num_heads // ranks


def keys_smoothed_by_head_groups(k: Any, heads: int) -> Any:
    """SageAttention's smooth_k (k minus its mean over the tokens, per head and channel, in place),
    computed `heads` heads at a time. SageAttention takes the mean of all heads in one torch
    reduction, whose CUDA launch (how many blocks share one column's sum) depends on the number of
    columns, so a GPU holding 20 of the 40 heads (Ulysses over 2) sums each column in another
    order than one GPU holding all 40: some means differ by one bf16 ulp, and so do the INT8 keys.
    Groups of a fixed head count give every split the same launch, hence the same bits.
    `k`: [L, H, D], contiguous; H a multiple of `heads`."""
    for start in range(0, k.shape[1], heads):
        part = k[:, start:start + heads]
        part.sub_(part.mean(dim=0, keepdim=True))
    return k


def _cuda_seconds(torch: Any, call: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def reference_rows(torch: Any, q: Any, k: Any, v: Any, rows: Any) -> Any:
    """Exact attention in fp32 for the given query rows (all keys), one head at a time: [R, H, D]."""
    scale = q.shape[-1] ** -0.5
    qs = q[rows].float()
    out = torch.empty_like(qs)
    for h in range(q.shape[1]):
        kh = k[:, h].float()
        p = torch.softmax((qs[:, h] @ kh.T) * scale, dim=-1)
        out[:, h] = p @ v[:, h].float()
        del kh, p
    return out


class KeysKept:
    """Gives k back its values after each call of a backend in MUTATES_KEYS. The copy sits in host
    memory (0.77 GB at 720p) so that measuring costs no GPU memory beyond the kernels' own."""

    def __init__(self, k: Any, names: Iterable[str]):
        self.k = k
        self.saved = k.to("cpu", copy=True) if any(n in MUTATES_KEYS for n in names) else None

    def call(self, name: str, fn: Callable[[Any, Any, Any], Any], q: Any, v: Any) -> Any:
        out = fn(q, self.k, v)
        self.restore(name)
        return out

    def restore(self, name: str) -> None:
        if self.saved is not None and name in MUTATES_KEYS:
            self.k.copy_(self.saved)


def measure_attention(torch: Any, q: Any, k: Any, v: Any, fns: dict[str, Callable[[Any, Any, Any], Any]],
                      names: Iterable[str], *, query_rows: int = TIMING_QUERY_ROWS, ref_rows: int = REFERENCE_ROWS,
                      reps: int = TIMING_REPS, clock: Callable[[str, Callable[[], Any]], float] | None = None
                      ) -> list[Trial]:
    """Time each backend on the first `query_rows` rows of q against all of k, v (one untimed call
    first: JIT compilation) and measure its relative L2 error on `ref_rows` rows spread over that
    prefix. The prefix keeps SageAttention's per-block quantisation of q exactly as in a full call.
    `clock(name, call)`: seconds of one call (default: CUDA events; tests pass fake timings).
    k is the same tensor afterwards, bit for bit, whichever backends ran (KeysKept)."""
    clock = clock or (lambda name, call: _cuda_seconds(torch, call))
    names = list(names)
    keys = KeysKept(k, names)
    n = min(q.shape[0], query_rows)
    qp = q[:n]
    rows = torch.linspace(0, n - 1, min(ref_rows, n), device=q.device).round().long()
    ref = reference_rows(torch, qp, k, v, rows)
    ref_norm = torch.linalg.vector_norm(ref).item()
    trials = []
    for name in names:
        fn = fns.get(name)
        if fn is None:
            trials.append(Trial(name, error="not importable"))
            continue
        failure = None
        try:
            out = keys.call(name, fn, qp, v)
            # Same seed, same frames is a promise of the app: a kernel whose two calls on the same
            # inputs differ (an order-dependent reduction) is never chosen.
            repeatable = bool(torch.equal(out, keys.call(name, fn, qp, v)))
            rel = (torch.linalg.vector_norm(out[rows].float() - ref).item() / ref_norm) if ref_norm else 0.0
            del out
            if not repeatable:
                trials.append(Trial(name, error="not repeatable: two calls on the same inputs differed"))
                continue
            times = []
            for _ in range(reps):
                times.append(clock(name, lambda: fn(qp, k, v)))
                keys.restore(name)
            trials.append(Trial(name, seconds=sorted(times)[len(times) // 2], rel_l2=rel))
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here (or needs more memory
            # than is left: also "cannot run here", never a failed run) is simply not chosen
            failure = f"{type(exc).__name__}: {str(exc)[:120]}"
            keys.restore(name)
        if failure is not None:
            # Outside the except block: the traceback's tensors are gone, give their memory back.
            trials.append(Trial(name, error=failure))
            if "out of memory" in failure.lower() and torch.cuda.is_available():
                torch.cuda.empty_cache()
    return trials


@dataclass
class AttentionSelector:
    """Self-attention for the DiT: measures at the first call of a shape, then dispatches.

    `force`: always this backend (bench variants, bisecting); `store`: where choices persist;
    `ranks`: the sequence-parallel group whose rank 0 chooses for every rank (None: this GPU alone)."""

    torch: Any
    fns: dict[str, Callable[[Any, Any, Any], Any]]
    offered: list[str]
    baseline: str
    gpu_name: str
    versions: str
    store: ChoiceStore | None = None
    force: str | None = None
    clock: Callable[[str, Callable[[], Any]], float] | None = None
    choices: dict[str, AttentionChoice] = field(default_factory=dict)
    ranks: RankGroup | None = None
    offered_everywhere: bool = False  # `offered` narrowed to the kernels every rank offers

    def choice_for(self, q: Any, k: Any, v: Any) -> AttentionChoice:
        key = attention_key(q.shape[0], q.shape[1], q.shape[2], str(q.dtype).replace("torch.", ""), self.versions)
        choice = self.choices.get(key)
        if choice is not None:
            return choice
        if self.ranks is not None and self.ranks.size > 1:
            choice = self._agreed(key, q, k, v)
        else:
            choice = self._decide(key, q, k, v)
        self.choices[key] = choice
        return choice

    def _agreed(self, key: str, q: Any, k: Any, v: Any) -> AttentionChoice:
        """Rank 0's choice, run by every rank. Ulysses calls the attention with the same shape on
        every rank (all tokens, heads/N) between two all-to-alls, so every rank reaches the first
        call of a shape at the same point: rank 0 measures on its head shard (or reads its store)
        and broadcasts; the others measure nothing. A failure on rank 0 is broadcast too, so that
        no rank waits for a choice that never comes."""
        assert self.ranks is not None
        if not self.offered_everywhere:
            self._offer_what_every_rank_runs()
        mine: AttentionChoice | None = None
        failure: BaseException | None = None
        if self.ranks.rank == 0:
            try:
                mine = self._decide(key, q, k, v)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others know
                failure = exc
        shared = self.ranks.broadcast(None if mine is None else mine.to_json())
        if failure is not None:
            raise failure
        if shared is None:
            raise RuntimeError("rank 0 of the sequence-parallel group failed to choose the attention kernel")
        choice = AttentionChoice.from_json(shared)
        source = choice.source if self.ranks.rank == 0 else f"{choice.source} on rank 0"
        return replace(choice, source=source, ranks=self.ranks.size)

    def _offer_what_every_rank_runs(self) -> None:
        """Only the kernels every rank can run are offered (cards of another compute capability, or
        another PyTorch, offer others). Asked at the first call, in the forward, not when the build
        makes the selector: there a rank whose load failed before its build reached the kernels
        (host memory shared by N pinning ranks runs out on some) waits in the load's agreement on
        the same group, and a collective of the build would hold every rank until the timeout."""
        assert self.ranks is not None
        everywhere = self.ranks.all_gather(list(self.offered))
        self.offered = [name for name in self.offered if all(name in other for other in everywhere)]
        if self.offered and self.baseline not in self.offered:
            self.baseline = self.offered[0]
        self.offered_everywhere = True

    def _decide(self, key: str, q: Any, k: Any, v: Any) -> AttentionChoice:
        shape = key.split("/")[1]
        if self.force is not None:
            choice = AttentionChoice(self.force, self.baseline, shape, self.gpu_name, source="forced")
        else:
            choice = self._cached(key)
            if choice is None:
                started = time.perf_counter()
                trials = measure_attention(self.torch, q, k, v, self.fns, self.offered, clock=self.clock)
                backend = choose_attention(trials, self.baseline)
                if backend != self.baseline and not self._repeatable(backend, q, k, v):
                    # The measurement saw a prefix of the queries; the frames come from the whole call.
                    log.warning("attention %s is not repeatable on the whole %s call; keeping %s",
                                backend, shape, self.baseline)
                    trials = [replace(t, error="not repeatable on the whole call", seconds=None)
                              if t.backend == backend else t for t in trials]
                    backend = self.baseline
                choice = AttentionChoice(backend, self.baseline, shape, self.gpu_name, tuple(trials), time.time())
                log.info("attention at %s on %s: %s (measured in %.1f s: %s)", shape, self.gpu_name, choice.backend,
                         time.perf_counter() - started, choice.summary()["trials"])
                # A backend that ran out of memory mid-run on a small card may fit another time:
                # such a choice holds for this process only, and the next one measures again.
                if self.store is not None and not any("out of memory" in (t.error or "").lower() for t in trials):
                    self.store.record_kernel_choice(self.gpu_name, key, choice.to_json())
        return choice

    def _repeatable(self, backend: str, q: Any, k: Any, v: Any) -> bool:
        fn = self.fns[backend]
        keys = KeysKept(k, [backend])
        try:
            return bool(self.torch.equal(keys.call(backend, fn, q, v), keys.call(backend, fn, q, v)))
        except Exception:  # noqa: BLE001 - cannot run the whole call here (memory): not chosen
            keys.restore(backend)
            log.warning("attention %s could not run the whole call twice", backend, exc_info=True)
            return False

    def _cached(self, key: str) -> AttentionChoice | None:
        if self.store is None:
            return None
        text = self.store.kernel_choice(self.gpu_name, key)
        if text is None:
            return None
        try:
            choice = AttentionChoice.from_json(text)
        except (ValueError, TypeError, KeyError):
            return None
        if choice.backend not in self.fns or choice.backend not in self.offered:
            return None  # measured with a backend this process cannot run: measure again
        if set(self.offered) - {trial.backend for trial in choice.trials}:
            return None  # a kernel installed since (FlashAttention 3, say) was never measured: measure again
        return AttentionChoice(**{**asdict(choice), "trials": choice.trials, "source": "cached"})

    def __call__(self, q: Any, k: Any, v: Any) -> Any:
        """[L, H, D] x3 -> [L, H*D], like LightX2V's attention weights' apply."""
        out = self.fns[self.choice_for(q, k, v).backend](q, k, v)
        return out.reshape(q.shape[0], -1)

    def summary(self) -> list[dict[str, Any]]:
        return [c.summary() for c in self.choices.values()]


# ------------------------------------------------------------------------------------------------
# INT8 GEMM autotune configs (pure)

SM86_SMEM_PER_BLOCK = 99 * 1024  # opt-in maximum per block on sm_86 / sm_89 (101,376 bytes)

# BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps. LightX2V's four first (kept where they fit), then
# smaller tiles that fit an sm_86 SM: 96 KB and below.
INT8_GEMM_TILES = (
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 8),
    (256, 128, 64, 3, 8),
    (256, 128, 64, 4, 8),
    (128, 256, 64, 3, 8),
    (128, 256, 64, 4, 8),
    (128, 128, 128, 3, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 5, 8),
    (64, 128, 128, 4, 4),
)


def int8_gemm_smem_bytes(block_m: int, block_n: int, block_k: int, num_stages: int, elem_bytes: int = 1) -> int:
    """Shared memory of the software-pipelined main loop: `num_stages` buffers of one A tile
    (BLOCK_M x BLOCK_K) and one B tile (BLOCK_K x BLOCK_N), INT8 = 1 byte per element. The epilogue
    reuses that space."""
    return num_stages * (block_m * block_k + block_k * block_n) * elem_bytes


# The list the compat layer installs: every tile fits an sm_86 SM. 128x128x64/s4/w4 first: the fastest
# tile at all four model shapes on an H200 (1,102-1,164 TOPS against 822-963 for LightX2V's favourite
# 256x128x128/s3 under the same conditions, docs/benchmarks/kernels-micro-2026-11-30-NVIDIA_H200.json);
# the others give the autotuner room on GPUs with fewer SMs. A short list keeps autotuning (once per
# shape) short and its noisy picks among near-equal tiles rare.
INT8_GEMM_INSTALLED = (
    (128, 128, 64, 4, 4),
    (256, 128, 64, 4, 8),
    (128, 256, 64, 4, 8),
    (256, 128, 64, 3, 8),
)


def int8_gemm_tiles_for(smem_limit: int, tiles: Iterable[tuple[int, int, int, int, int]] = INT8_GEMM_INSTALLED
                        ) -> list[tuple[int, int, int, int, int]]:
    """The tiles that fit the GPU's shared memory per block (all of INT8_GEMM_INSTALLED on sm_86+)."""
    return [t for t in tiles if int8_gemm_smem_bytes(*t[:4]) <= smem_limit]


# ------------------------------------------------------------------------------------------------
# Assembly (the backend calls this once per build)


def build_selector(torch: Any, sage_fn: Callable[..., Any] | None, sage_exports: Iterable[str], *,
                   store: ChoiceStore | None = None, force: str | None = None,
                   ranks: RankGroup | None = None) -> AttentionSelector:
    """An AttentionSelector for GPU 0: the backends it can run, LightX2V's kernel as the baseline.
    `sage_fn`: the function LightX2V's sage_attn2 calls (None where it has none). `ranks`: a
    sequence-parallel group; rank 0 chooses for all among the backends every rank can run (both
    settled at the first call: building the selector asks no other rank)."""
    capability = torch.cuda.get_device_capability(0)
    fns = attention_functions(torch, sage_fn)
    offered = available_attention(capability, sage_exports=sage_exports if sage_fn is not None else (),
                                  cudnn_sdpa=torch.backends.cuda.cudnn_sdp_enabled(),
                                  flash_attn=FLASH_ATTN2 in fns, flash_attn3=FLASH_ATTN3 in fns)
    offered = [name for name in offered if name in fns]
    if force is not None and force not in offered:
        raise ValueError(f"attention backend {force!r} cannot run on this GPU; available: {offered}")
    try:
        from importlib import metadata

        sage_version = metadata.version("sageattention")
    except Exception:  # noqa: BLE001 - PackageNotFoundError or a broken install: no version
        sage_version = "none"
    return AttentionSelector(torch=torch, fns=fns, offered=offered, baseline=offered[0],
                             gpu_name=torch.cuda.get_device_name(0),
                             versions=f"torch{torch.__version__}-sage{sage_version}", store=store, force=force,
                             ranks=ranks)


def install(compat: Any, fixes: Any, torch: Any, build: dict[str, Any], transformer_weights: Any, *,
            sage_attn_module: Any, sageattention: Any, triton_kernels: Any, attention: str = "auto",
            store: ChoiceStore | None = None, transformer_infer: Any = None, rope_cls: Any = None,
            rms_module: Any = None, ranks: RankGroup | None = None) -> AttentionSelector | None:
    """The kernel hooks of one LightX2V build, through the compat layer (each skippable by name):
    SageAttention 1.0.6 on RTX 40/50, the INT8 GEMM tiles for this GPU, the fused elementwise
    chains of the DiT block (lightx2v_compat.FUSION_NAMES) and the self-attention selector. Returns
    the selector, or None where the attention swap is off or not applicable. `ranks`: the
    sequence-parallel group whose ranks run rank 0's choice (build_selector)."""
    capability = torch.cuda.get_device_capability(0)
    if rope_cls is not None:
        compat.rope_fused(fixes, transformer_weights, rope_cls)
    if rms_module is not None:
        compat.qk_rms_norm_fused(fixes, transformer_weights, rms_module)
    if transformer_infer is not None:
        compat.gate_residual_fused(fixes, transformer_infer)
    compat.sage_attention_on_sm89_sm120(fixes, sage_attn_module, sageattention, capability)
    if build["quant_scheme"] == "int8-triton" and triton_kernels is not None:
        compat.int8_gemm_tiles_for_this_gpu(fixes, triton_kernels,
                                            torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    if build["attn_mode"] not in (SAGE, TORCH_SDPA):
        return None  # flash_attn builds: the user asked for that kernel
    sage_fn = getattr(sage_attn_module, "sageattn", None) if build["attn_mode"] == SAGE else None
    selector = build_selector(torch, sage_fn, dir(sageattention) if sageattention is not None else (),
                              store=store, force=None if attention == "auto" else attention, ranks=ranks)
    compat.sage_keys_smoothed_by_head_groups(fixes, selector, getattr(transformer_infer, "num_heads", None))
    compat.attention_chosen_by_measurement(fixes, transformer_weights, selector)
    return selector if fixes.has("attention_chosen_by_measurement") else None
