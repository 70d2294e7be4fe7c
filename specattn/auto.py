"""`--method auto`: speculate only where it pays, decided by a cost model measured on this machine and model.

The run is one self-speculative loop whose controller chooses, before every round, between a speculative round of
gamma drafts (drafting with SpecAttn-Y's or MagicDec's selection) and a chunk of plain dense decoding steps (gamma
0). It predicts tokens per second per sequence for each:

    dense:        1 / t_step(context)
    speculative:  E[tokens per round] / t_round(context)

with E[tokens per round] (accepted drafts + the bonus token, per sequence still generating) the mean of the rounds
seen so far, seeded by earlier runs of the shape or by 0.8 acceptance per draft, and t_step, t_round measured by
the loop's own CUDA events (read once the GPU got there, so calibration costs no extra pass). Times are kept per
byte moved (weights + the KV entries a step reads), so a cost measured at one context predicts another as the
context grows. What a shape (model, device, dtype, batch, context bucket, budget, gamma, greedy or sampling) has
learned is cached in a JSON file: a later run of that shape starts from it instead of exploring.

Every choice is lossless (AR steps or exact verification), so the output is AR's whatever is chosen.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import SpeculationParams, make_policy
from .cache import PagedKVCache
from .decoding.ar import GenerationParams, GenerationResult, generate_ar
from .decoding.self_speculative import cache_tokens_needed, generate_self_speculative
from .evaluation.results import write_json_atomic
from .model import Transformer

AUTO_POLICIES = ("specattn-y", "magicdec")   # the drafting policies auto chooses between, round by round
DEFAULT_ALPHA = 0.8        # per-draft acceptance assumed before any round of this shape was seen
PRIOR_ROUNDS = 2.0         # how many rounds the cached / default tokens-per-round estimate counts as
TIME_EMA = 0.5             # weight of a new time observation
# Deciding for the sequences still generating (bytes with the finished ones idle; times per byte learned at full
# batch only): off. On the H200 (auto_tail.json, benchmarks/auto_tail.py) it finished a batch of 64 with dense steps
# once 8 sequences were left, as designed, but such a step still cost ~1.9 ms (inferred from the run's total; 4.43
# with all 64 generating: ~1.5 ms of launch-bound work whatever the bytes), so it lost: 1.25x AR against 1.35x at
# batch 64 x 8K.
TAIL_AWARE = False
TOKENS_DECAY = 1.0         # weight a round's tokens keep per later round (1: the plain mean; 0.8: ~5 rounds' memory)
RECHECK_EVERY = 64         # dense steps after which a near-break-even speculation is tried again
RECHECK_RATIO = 0.9        # "near": predicted speculative rate at least this share of the dense rate


def default_cache_path() -> Path:
    root = os.environ.get("SPECATTN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "specattn")
    return Path(root) / "auto.json"


def shape_key(model: Transformer, device: torch.device, batch: int, context: int, spec: SpeculationParams,
              greedy: bool) -> str:
    source = getattr(model, "source", None)
    cfg = model.cfg
    name = str(getattr(source, "path", "")) or f"{cfg.architecture}-{cfg.num_layers}x{cfg.hidden_size}"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bucket = 1 << max(0, math.ceil(math.log2(max(context, 1))))
    mode = "greedy" if greedy else "sampling"
    tp = f"|tp{model.tp.world}" if model.tp else ""
    dense = ",".join(map(str, sorted(set(spec.dense_layers)))) or "none"    # what a draft step reads depends on it
    return (f"{name}|{dev}|{model.embed.weight.dtype}|b{batch}|ctx<={bucket}|budget{spec.budget:g}|g{spec.gamma}"
            f"|dense-{dense}|{mode}{tp}")


@dataclass(frozen=True)
class ByteModel:
    """Bytes a dense step and a speculative round move at a given mean context (all sequences of the batch)."""
    weight_bytes: int
    kv_bytes_per_token: int      # one token, all layers
    batch: int
    budget: float                # draft KV budget: tokens, or a fraction of the context if < 1
    dense_fraction: float        # share of layers that draft with the full cache
    gamma: int

    @classmethod
    def of(cls, model: Transformer, cache: PagedKVCache, batch: int, spec: SpeculationParams) -> ByteModel:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        dense = len(set(spec.dense_layers)) / model.cfg.num_layers
        return cls(weights, cache.bytes_per_token, batch, spec.budget, dense, spec.gamma)

    def step(self, context: float, active: int | None = None, new: int = 1) -> float:
        """A dense step of `new` tokens: the `active` sequences (default all) read their whole context, finished
        ones (idle until the batch is done) only their new tokens."""
        active = self.batch if active is None else active
        return self.weight_bytes + self.kv_bytes_per_token * (active * context + (self.batch - active) * new)

    def round(self, context: float, active: int | None = None) -> float:
        """gamma sparse draft steps (every sequence reads its budget; idle ones only their new token in the
        dense layers) and the verification of gamma + 1 tokens."""
        active = self.batch if active is None else active
        budget = self.budget * context if self.budget < 1 else min(self.budget, context)
        draft_tokens = (self.dense_fraction * (active * context + self.batch - active)
                        + (1 - self.dense_fraction) * self.batch * budget)
        draft = self.weight_bytes + self.kv_bytes_per_token * draft_tokens
        return self.gamma * draft + self.step(context + self.gamma, active, self.gamma + 1)


@dataclass
class Arm:
    """What auto knows of one way to run a round: seconds per byte moved and, when it speculates, tokens per
    round: a mean that forgets old rounds (TOKENS_DECAY a round), seeded by a prior worth PRIOR_ROUNDS rounds,
    since the sequences a fixed batch still waits for at its end are the ones that accept least."""
    s_per_byte: float | None = None
    tokens: float = 0.0
    rounds: float = 0.0
    replayed: bool = False   # this run replayed the arm's graphs once (that first replay also uploads them)
    seen_tokens: float = 0.0     # this run's plain sums, for the prior of the next run
    seen_rounds: int = 0

    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 1.0

    def observe_tokens(self, tokens: float) -> None:
        self.tokens = TOKENS_DECAY * self.tokens + tokens
        self.rounds = TOKENS_DECAY * self.rounds + 1
        self.seen_tokens += tokens
        self.seen_rounds += 1

    def mean_tokens_per_round(self) -> float:
        return self.seen_tokens / self.seen_rounds if self.seen_rounds else self.tokens_per_round()


class CostModel:
    """The controller of an auto run (AdaptiveGamma's interface): per round, a chunk of dense steps (0) or a
    speculative round with one of the drafting policies, (gamma, name), whichever predicts more tokens/s."""

    def __init__(self, gamma: int, bytes_model: ByteModel, policies: tuple[str, ...], known: dict | None = None):
        known = known or {}
        self.gamma, self.bytes = gamma, bytes_model
        self.dense = Arm(known.get("step_s_per_byte"))
        default = geometric_tokens_per_round(DEFAULT_ALPHA, gamma)
        self.spec = {}
        for name in policies:
            seen = known.get("arms", {}).get(name, {})
            # Tokens per round measured rather than modelled: acceptance is not independent per draft (a run of
            # easy text accepts everything), and a geometric fit through few rounds was 25% low on the GPU.
            prior = seen.get("tokens_per_round", default)
            self.spec[name] = Arm(seen.get("round_s_per_byte"), PRIOR_ROUNDS * prior, PRIOR_ROUNDS)
        self.accepted = self.drafted = 0
        self.rounds_run = dict.fromkeys(policies, 0)      # this run's speculative rounds per policy
        self.context = 0.0
        self.active = bytes_model.batch      # sequences still generating at the last decision
        self.dense_since_spec = 0
        self.predicted: dict[str, float] = {}    # tokens/s per sequence of each choice, at the last decision
        # (sequences generating, mean context, choice, predicted dense and best speculative tokens/s per sequence)
        self.decisions: list[tuple] = []

    @property
    def needs_timing(self) -> bool:
        """Whether a decision waits on a measurement still in flight (the loop then waits for the GPU)."""
        return self.dense.s_per_byte is None or any(a.s_per_byte is None for a in self.spec.values())

    def alpha(self) -> float:
        """Per-draft acceptance seen in this run (reported, not used for decisions)."""
        return self.accepted / max(1, self.drafted)

    def rates(self, context: float, active: int | None = None) -> tuple[float, dict[str, float]]:
        """Predicted tokens/s per sequence still generating: dense steps, and each policy's speculative rounds."""
        dense = 1 / (self.dense.s_per_byte * self.bytes.step(context, active))
        round_bytes = self.bytes.round(context, active)
        return dense, {n: a.tokens_per_round() / (a.s_per_byte * round_bytes) for n, a in self.spec.items()}

    def next(self, context: float, active: int | None = None) -> int | tuple[int, str]:
        """context: the mean context; active: sequences still generating (used with TAIL_AWARE: a fixed batch's
        finished ones idle, reading little, while the stragglers finish)."""
        self.context = context
        self.active = active if TAIL_AWARE and active is not None else self.bytes.batch
        for name, arm in self.spec.items():    # nothing known yet: measure each kind of round, then dense steps
            if arm.s_per_byte is None:
                return self.gamma, name
        if self.dense.s_per_byte is None:
            return 0
        dense, spec = self.rates(context, self.active)
        self.predicted = {"dense": dense, **spec}
        best = max(spec, key=spec.get)
        if spec[best] >= dense:
            choice = self.gamma, best
        elif self.dense_since_spec >= RECHECK_EVERY and spec[best] >= RECHECK_RATIO * dense:
            choice = self.gamma, best          # acceptance may have changed since the last round: look again
        else:
            choice = 0
        self.decisions.append((active, round(context), best if choice else "dense", dense, spec[best]))
        return choice

    def observe(self, choice, accepted: list[int], seconds: float, captured: bool, dense_steps: int = 0) -> None:
        # Time per byte is learned with the whole batch generating, where bytes dominate; with most of it idle a
        # step's fixed costs weigh more per byte, and one such time would mislead the next run's first rounds.
        full = self.active == self.bytes.batch          # always, unless TAIL_AWARE (see next)
        if choice == 0:
            self.dense_since_spec += dense_steps
            if not captured and dense_steps and (full or self.dense.s_per_byte is None):
                per_step = seconds / dense_steps / self.bytes.step(self.context, self.active)
                self.dense.s_per_byte = _ema(self.dense.s_per_byte, per_step)
            return
        gamma, name = choice
        arm = self.spec[name]
        self.rounds_run[name] += 1
        self.dense_since_spec = 0
        if accepted:
            arm.observe_tokens(1 + sum(accepted) / len(accepted))
            self.accepted += sum(accepted)
            self.drafted += gamma * len(accepted)
        if captured:
            return
        # The first replay of freshly captured graphs also uploads them to the GPU (milliseconds for thousands of
        # nodes): not a round's cost, so it is not measured; an arm is explored until a later round is.
        if arm.replayed and (full or arm.s_per_byte is None):
            arm.s_per_byte = _ema(arm.s_per_byte, seconds / self.bytes.round(self.context, self.active))
        arm.replayed = True

    def state(self) -> dict:
        return {"step_s_per_byte": self.dense.s_per_byte,
                "arms": {n: {"round_s_per_byte": a.s_per_byte, "tokens_per_round": a.mean_tokens_per_round()}
                         for n, a in self.spec.items()}}


class RankZeroDecides:
    """A controller's choices under tensor parallelism: each rank times its own steps, so their cost models may
    differ; rank 0's choice is broadcast and every rank runs it (ranks that ran different steps would wait
    forever in each other's all-reduces). Observations still reach every rank's own model."""

    def __init__(self, inner: CostModel, tp, policies: tuple[str, ...], device: torch.device):
        self.inner, self.tp, self.policies, self.device = inner, tp, policies, device

    @property
    def needs_timing(self) -> bool:
        return self.inner.needs_timing

    def next(self, context: float, active: int | None = None) -> int | tuple[int, str]:
        choice = self.inner.next(context, active)
        code = torch.tensor([0 if choice == 0 else 1 + self.policies.index(choice[1])], device=self.device)
        code = int(self.tp.broadcast(code).item())
        return 0 if code == 0 else (self.inner.gamma, self.policies[code - 1])

    def observe(self, *args, **kwargs) -> None:
        self.inner.observe(*args, **kwargs)


def geometric_tokens_per_round(alpha: float, gamma: int) -> float:
    """1 + a + ... + a^gamma: tokens per round when each draft is accepted with probability a independently."""
    return sum(alpha ** i for i in range(gamma + 1))


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - TIME_EMA) * old + TIME_EMA * new


def auto_cache(model: Transformer, prompts: list[list[int]], params: GenerationParams,
               spec: SpeculationParams) -> PagedKVCache:
    """The KV cache a speculative run needs (dense chunks fit in it too: their length respects its room). Sized
    like AR's cache of the same request, so the attention kernels split the same way and dense chunks give
    AR's tokens bit for bit."""
    need = cache_tokens_needed(max(len(p) for p in prompts), params.max_new_tokens, spec.gamma)
    return PagedKVCache(model.cfg, len(prompts), need, dtype=model.embed.weight.dtype, device=model.embed.weight.device,
                        page_size=spec.page_size)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}                                    # a damaged cache file is re-measured, not fatal


def generate_auto(model: Transformer, prompts: list[list[int]], params: GenerationParams, spec: SpeculationParams,
                  cache_path: Path | None = None, cache: PagedKVCache | None = None,
                  steps: dict | None = None) -> GenerationResult:
    """Decode choosing per round between dense steps and SpecAttn-Y or MagicDec rounds (see the module doc).
    `cache` (from auto_cache) and `steps` (an earlier result's runner) let repeated runs skip allocation and
    graph capture."""
    cache_path = cache_path or default_cache_path()
    device = model.embed.weight.device
    key = shape_key(model, device, len(prompts), max(len(p) for p in prompts), spec, params.sampling.greedy)
    cache = cache or auto_cache(model, prompts, params, spec)
    if spec.budget >= 1 and spec.budget >= min(len(p) for p in prompts):
        return _dense_only(model, cache, prompts, params, key)     # nothing to drop: drafting cannot be sparse
    known = _read(cache_path)
    had_costs = key in known
    policies = {name: make_policy(name, spec, model.cfg.num_layers) for name in AUTO_POLICIES}
    controller = CostModel(spec.gamma, ByteModel.of(model, cache, len(prompts), spec), AUTO_POLICIES, known.get(key))
    deciding = RankZeroDecides(controller, model.tp, AUTO_POLICIES, device) if model.tp else controller
    result = generate_self_speculative(model, cache, prompts, params, policies, spec.gamma, steps,
                                       controller=deciding)
    if model.tp is None or model.tp.rank == 0:          # under tensor parallelism rank 0's costs decide
        known = _read(cache_path)                        # another process may have written meanwhile
        known[key] = controller.state()
        write_json_atomic(cache_path, known)
    s = result.stats
    speculative_tokens = s["new_tokens"] - len(prompts) - s["dense_steps"] * len(prompts)
    s.update({"method": "auto", "auto_key": key, "auto_had_costs": had_costs,
              "auto_speculative_rounds": s["rounds"], "auto_dense_steps": s["dense_steps"],
              "auto_speculative_share": max(0.0, speculative_tokens) / max(1, s["new_tokens"] - len(prompts)),
              "auto_alpha": controller.alpha(), "auto_rounds_by_policy": dict(controller.rounds_run),
              "auto_predicted_tokens_per_s": {k: v * len(prompts) for k, v in controller.predicted.items()},
              "auto_decisions": controller.decisions})
    return result


def _dense_only(model: Transformer, cache: PagedKVCache, prompts: list[list[int]], params: GenerationParams,
                key: str) -> GenerationResult:
    """auto where the draft budget covers a whole prompt: plain AR decoding, with auto's stats."""
    result = generate_ar(model, cache, prompts, params)
    steps = max(len(t) for t in result.tokens) - 1
    result.stats.update({"method": "auto", "auto_key": key, "auto_had_costs": False, "rounds": 0,
                         "dense_steps": steps, "auto_speculative_rounds": 0, "auto_dense_steps": steps,
                         "auto_speculative_share": 0.0, "auto_alpha": 0.0, "auto_rounds_by_policy": {},
                         "auto_predicted_tokens_per_s": {}, "auto_decisions": []})
    return result
