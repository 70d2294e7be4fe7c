"""Self-speculative decoding: the model drafts with a sparse subset of its own KV cache and verifies the
drafts with the full cache in one pass (SpecAttn-Y / MagicDec-style drafting, by selection policy).

One round: select -> gamma sparse draft steps -> one dense verify pass over [last token, drafts] that
overwrites the drafts' K/V (computed with sparse attention) and, as a by-product, gives the attention mass
per page -> accept -> truncate to the accepted length -> feed the mass back to the policy. Output equals
dense AR decoding: token for token under greedy, in distribution when sampling.

On the GPU the gamma draft steps are one CUDA graph and the verify step another (`RoundSteps`); the draft
steps move only the device copy of the lengths and put it back, so the host does one sync per round.
"""
from __future__ import annotations

import math
import time

import torch

from ..cache import PagedKVCache, to_device
from ..distributed import mean_over_ranks
from ..errors import InvalidInputError
from ..model import Transformer
from ..selection import PageSelection, QuestSelection, SelectionPolicy
from .acceptance import accept_greedy, accept_sampling
from .ar import GenerationParams, GenerationResult, _sync, cut_at_stop, decode_step
from .runner import (
    StepRunner,
    capture_graph,
    check_prompts,
    idle_lists_shortened,
    planned_graph,
    prefill,
    prepare_graphs,
    tail_plan,
)
from .sampling import SamplingParams, agree, probabilities, sample, sample_inverse_cdf


def cache_tokens_needed(prompt_tokens: int, max_new_tokens: int, gamma: int) -> int:
    """Per-sequence cache capacity a run needs: a sequence that is done stops growing, but it can be done
    with up to gamma tokens to spare and still takes part in one more round of gamma + 1 tokens."""
    return prompt_tokens + max_new_tokens + 2 * gamma + 1


def draft_steps(model: Transformer, cache: PagedKVCache, selection, first_tok: torch.Tensor, gamma: int,
                sampling: SamplingParams, uniforms: torch.Tensor | None, kv_len_hint: int | None,
                page_mass: torch.Tensor | None = None, after_step=None,
                mass_layers: frozenset | None = None, mass_steps: frozenset | None = None,
                plan: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gamma sparse decode steps from first_tok: drafts [batch, gamma] and, when sampling, the draft's
    distributions [batch, gamma, vocab]. Pages for gamma + 1 tokens must be reserved. Only the device lengths
    move, and they are put back at the end: the drafts' K/V stay past each sequence's end for the verify
    step to overwrite. Graph-capturable (kv_len_hint None) and the eager path alike. `page_mass`: a buffer each
    step's attention fills with its mass per page (zeroed first; only `mass_layers` if given, only the steps
    numbered in `mass_steps` if given); `after_step()` runs after the forward of each of those steps.

    first_tok [batch, 2] (a draft model's catch-up): the token before each sequence's end, whose K/V the draft
    may not have yet, and the first token; the first step then runs over both, writing (or rewriting) both.
    `plan`: the dense attention's tail plan (tail_plan), for a fixed batch's tail."""
    batch = first_tok.shape[0]
    selection = idle_lists_shortened(selection, cache)
    drafts, probs_list, tok = [], [], first_tok
    for i in range(gamma):
        q_len = tok.shape[1] if tok.dim() == 2 else 1
        if q_len > 1:                 # the catch-up token sits at the last position (no extra kernel otherwise)
            cache.lens[:batch] -= q_len - 1
        view = cache.step_view(q_len, static=True)
        view.max_kv_len = None if kv_len_hint is None else kv_len_hint + i + 1
        view.selection, view.active = selection, plan
        measured = mass_steps is None or i in mass_steps
        if page_mass is not None and measured:
            page_mass.zero_()
            view.page_mass, view.mass_layers = page_mass, mass_layers
        logits = model(tok.view(batch, q_len), cache, view)[:, -1]
        cache.lens[:batch] += q_len
        if after_step is not None and measured:
            after_step()
        if sampling.greedy:
            tok = logits.argmax(-1)
        else:
            probs = probabilities(logits, sampling)
            tok = sample_inverse_cdf(probs, uniforms[:, i])
            probs_list.append(probs)
        drafts.append(tok)
    cache.lens[:batch] -= gamma
    return torch.stack(drafts, dim=1), (torch.stack(probs_list, dim=1) if probs_list else None)


class RoundSteps:
    """The two forward parts of a round, eager or (CUDA) as captured graphs.

    A draft graph is captured per kind of selection (dense, page lists of a capacity, Quest with a page
    budget); each round copies the policy's fresh selection into that graph's static tensors. The verify
    graph writes the page mass (or Vegas token scores) into buffers the policy then reads.
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, policy: SelectionPolicy, batch: int, gamma: int,
                 sampling: SamplingParams, use_cuda_graph: bool = True, catch_up: bool = False):
        self.model, self.cache, self.batch, self.gamma, self.sampling = model, cache, batch, gamma, sampling
        self.catch_up = catch_up         # first tokens come in pairs (see draft_steps)
        self.policy = policy
        self.use_graph = prepare_graphs(model, cache, use_cuda_graph)
        cfg, dev = model.cfg, cache.device
        self.page_mass = self.token_scores = None
        if policy.wants_page_mass:
            self.page_mass = torch.zeros(cfg.num_layers, batch, cfg.num_kv_heads, cache.max_pages_per_seq, device=dev)
        if policy.wants_token_scores:
            self.token_scores = torch.zeros(cfg.num_layers, batch, cache.max_pages_per_seq * cache.page_size,
                                            device=dev)
            self.verify_start = torch.zeros(batch, dtype=torch.int32, device=dev)   # written by the verify step
        # Policies that can select from device state alone do so inside the draft graph (see draft_selecting).
        width = getattr(policy, "device_list_width", None)
        self.device_select_width = width(cache, gamma) if width else None
        self.first_tok = torch.zeros((batch, 2) if catch_up else (batch,), dtype=torch.long, device=dev)
        self.uniforms = torch.ones(batch, gamma, device=dev)
        self.verify_in = torch.zeros(batch, gamma + 1, dtype=torch.long, device=dev)
        self._draft_graphs: dict[tuple, tuple] = {}
        # by whether the step writes the mass buffers, and the tail plan (None: the whole batch)
        self._verify_graphs: dict[tuple[bool, int | None], tuple] = {}

    def fits(self, model, cache, policy, batch: int, gamma: int, sampling: SamplingParams,
             catch_up: bool = False) -> bool:
        """Whether these graphs can serve a run (kept across runs so capture is paid once)."""
        return (model is self.model and cache is self.cache and policy.settings() == self.policy.settings()
                and batch == self.batch and gamma == self.gamma and sampling == self.sampling
                and catch_up == self.catch_up)

    def graph_count(self) -> int:
        return len(self._draft_graphs) + len(self._verify_graphs)

    # ---- draft -----------------------------------------------------------------------------
    def draft(self, selection, first_tok: torch.Tensor, generator: torch.Generator, active: int | None = None):
        """active: how many sequences still generate. A draft model's dense drafting plans its attention for them in
        a fixed batch's tail, as verify does; page lists are cut for idle sequences instead (idle_lists_shortened).
        Self-speculation passes none: its only dense drafting, the full-KV control's, accepts every draft, so its
        sequences finish together."""
        uniforms = self._uniforms(generator)
        plan = tail_plan(active, self.batch) if selection is None else None
        if not self.use_graph:
            hint = max(self.cache.host_lens())
            return draft_steps(self.model, self.cache, selection, first_tok, self.gamma, self.sampling, uniforms, hint,
                               plan=plan)
        key = _selection_key(selection)
        graph, static_sel, out = planned_graph(self._draft_graphs, lambda p: (key, p), plan,
                                               active if selection is None else None, self.batch,
                                               lambda p: self._capture_draft(selection, key, p))
        _load_selection(static_sel, selection)
        return self._replay(graph, out, first_tok, uniforms)

    def _uniforms(self, generator: torch.Generator) -> torch.Tensor | None:
        """The draft sampler's randomness for this round, in (0, 1] (see sample_inverse_cdf); None when greedy."""
        if self.sampling.greedy:
            return None
        return 1 - torch.rand(self.uniforms.shape, device=self.cache.device, generator=generator)

    def _replay(self, graph, out, first_tok: torch.Tensor, uniforms: torch.Tensor | None):
        self.first_tok.copy_(first_tok)
        if uniforms is not None:
            self.uniforms.copy_(uniforms)
        graph.replay()
        return out

    def draft_selecting(self, first_tok: torch.Tensor, generator: torch.Generator):
        """Selection and the gamma draft steps as one graph: (drafts, draft distributions, the selection). The
        selection ranks by this RoundSteps' page-mass buffer (the policy's latest scores are copied in if they
        came from another one)."""
        uniforms = self._uniforms(generator)
        raw = self.policy.scores(self.cache)
        if raw is not None and self.page_mass is not None:
            if raw.data_ptr() != self.page_mass.data_ptr():
                self.page_mass.copy_(raw)
            raw = self.page_mass
        elif raw is not None and self.token_scores is not None:       # Vegas: scores and where they were taken
            if raw.data_ptr() != self.token_scores.data_ptr():        # another RoundSteps verified last
                self.token_scores.copy_(raw)
                self.verify_start.copy_(to_device(self.policy.verify_start(), torch.int32, self.cache.device))
            raw = (self.token_scores, self.verify_start)

        def body(first, unif, hint):
            selection = self.policy.select_on_device(self.cache, self.gamma, self.device_select_width, raw)
            drafts, probs = draft_steps(self.model, self.cache, selection, first, self.gamma, self.sampling, unif, hint)
            return drafts, probs, selection

        if not self.use_graph:
            return body(first_tok, uniforms, max(self.cache.host_lens()))
        key = ("device-select", raw is not None)
        if key not in self._draft_graphs:
            self._draft_graphs[key] = capture_graph(lambda: body(self.first_tok, self.uniforms, None))
        graph, out = self._draft_graphs[key]
        return self._replay(graph, out, first_tok, uniforms)

    def _capture_draft(self, selection, key, plan: int | None = None):
        static_sel = _static_selection(selection, key)
        _load_selection(static_sel, selection)
        graph, out = capture_graph(lambda: draft_steps(self.model, self.cache, static_sel, self.first_tok,
                                                       self.gamma, self.sampling, self.uniforms, None, plan=plan))
        return graph, static_sel, out

    # ---- verify ----------------------------------------------------------------------------
    def verify(self, tokens: torch.Tensor, by_product: bool = True, active: int | None = None) -> torch.Tensor:
        """Dense step over [last token, drafts]: logits [batch, gamma + 1, vocab]; fills the mass buffers unless
        by_product is False (they then keep the last values written). active: how many sequences still generate
        (the rest idle); a fixed batch's tail plans attention for them (see tail_plan)."""
        plan = tail_plan(active, self.batch)
        if not self.use_graph:
            if self.page_mass is not None and by_product:
                self.page_mass.zero_()
            return self._verify_body(tokens, self._planned_view(plan, static=False), by_product)
        graph, out = planned_graph(self._verify_graphs, lambda p: (by_product, p), plan, active, self.batch,
                                   lambda p: capture_graph(lambda: self._verify_body(self.verify_in,
                                                                                    self._planned_view(p), by_product)))
        self.verify_in.copy_(tokens)
        graph.replay()
        return out

    def _planned_view(self, plan: int | None, static: bool = True):
        view = self.cache.step_view(self.gamma + 1, static=static)
        view.active = plan
        return view

    def _verify_body(self, tokens, view, by_product: bool = True):
        if by_product:
            view.page_mass, view.token_scores = self.page_mass, self.token_scores
        scores = by_product and self.token_scores is not None
        if scores:                                    # the window the scores come from starts at today's lengths
            self.verify_start.copy_(self.cache.lens[: self.batch])
        view.mass_tokens = getattr(self.policy, "mass_tokens", None)
        logits = self.model(tokens, self.cache, view, all_logits=True)
        if scores:                                    # Vegas ranks by the mean over all heads, every rank's too
            mean_over_ranks(self.model.tp, self.token_scores)
        return logits


def _capacity(k: int) -> int:
    """List capacity a draft graph is captured for: k rounded up to 16 x a power of two, so a budget that grows
    with the context (a fraction, Vegas's 5%) seldom needs a new capture."""
    return 16 << max(0, math.ceil(math.log2(max(k, 1) / 16)))


def _selection_key(selection) -> tuple:
    if selection is None:
        return ("dense",)
    if isinstance(selection, QuestSelection):
        return ("quest", selection.budget_pages, selection.dense_layers)
    return ("pages", _capacity(selection.pages.shape[-1]), selection.dense_layers, selection.token_level,
            selection.physical is not None)


def _static_selection(selection, key: tuple):
    """Tensors a draft graph reads its selection from, shaped for every round of this key."""
    if selection is None:
        return None
    if isinstance(selection, QuestSelection):
        return QuestSelection(selection.budget_pages, selection.forced.clone(), selection.valid.clone(),
                              selection.key_min, selection.key_max, selection.page_size, selection.dense_layers)
    shape = (*selection.pages.shape[:-1], key[1])
    pages = torch.full(shape, -1, dtype=torch.int32, device=selection.pages.device)
    physical = None if selection.physical is None else torch.zeros_like(pages)
    return PageSelection(pages, selection.counts.clone(), selection.dense_layers, selection.token_level, physical)


def _load_selection(static, selection) -> None:
    if selection is None:
        return
    if isinstance(selection, QuestSelection):
        static.forced.copy_(selection.forced)
        static.valid.copy_(selection.valid)
        return
    k = selection.pages.shape[-1]
    static.pages[..., :k].copy_(selection.pages)
    static.pages[..., k:].fill_(-1)
    static.counts.copy_(selection.counts)
    if static.physical is not None:
        static.physical[..., :k].copy_(selection.physical)


class PhaseTimer:
    """Draft / verify / select / dense-step time without syncing inside the loop: CUDA events, read after the
    round's own sync (or at the end)."""

    PHASES = ("draft_s", "verify_s", "select_s", "ar_steps_s")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, phase: str, start) -> None:
        self.marks.append((phase, start, self.start()))

    def seconds(self, first_mark: int = 0, end_mark: int | None = None) -> float:
        """Time of the marks first_mark .. end_mark - 1 (their events must have completed)."""
        return sum(self._elapsed(a, b) for _, a, b in self.marks[first_mark:end_mark])

    def complete(self, end_mark: int) -> bool:
        """Whether the GPU has passed the marks before end_mark (never waits)."""
        return not self.cuda or end_mark == 0 or self.marks[end_mark - 1][2].query()

    def wait(self, end_mark: int) -> None:
        if self.cuda and end_mark:
            self.marks[end_mark - 1][2].synchronize()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def totals(self) -> dict[str, float]:
        out = dict.fromkeys(self.PHASES, 0.0)
        for phase, a, b in self.marks:
            out[phase] += self._elapsed(a, b)
        return out


class FullBatchRate:
    """Tokens per second over the rounds that began with every sequence still generating: what the batch would
    sustain if finished slots were refilled. Scaling the mean accepted length by every round's time would
    overstate it, since a fixed batch's tail rounds run on fewer sequences and cost less (tail plans). Round time
    is wall time between the rounds' ends (each speculative round syncs once)."""

    def __init__(self, start: float):
        self.last, self.seconds, self.tokens, self.rounds = start, 0.0, 0, 0
        self._round_full, self._emitted_before = False, 0

    def round_begins(self, log: RoundLog) -> None:
        self._round_full, self._emitted_before = not any(log.done()), sum(log.lengths())

    def round_ends(self, log: RoundLog, now: float) -> None:
        """After the round's sync, so that `now` includes its device time."""
        self.add(now, sum(log.lengths()) - self._emitted_before, self._round_full)

    def add(self, now: float, tokens: int, all_generating: bool) -> None:
        if all_generating:
            self.seconds += now - self.last
            self.tokens += tokens
            self.rounds += 1
        self.last = now

    def rate(self, fallback: float) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else fallback


class AdaptiveGamma:
    """Draft length from recent acceptance: one more draft than the recent mean accepted (an exponential average
    over rounds), between 1 and the maximum. Drafts that would mostly be rejected are not computed; when every
    draft is accepted, the length grows back.

    The loop's controller interface: next(mean context, sequences still generating) -> drafts for the next round
    (0: a few dense AR steps instead), observe(gamma, accepted, seconds, captured, dense_steps) after each round with
    the accepted counts of the sequences still generating, the round's measured time, whether it captured a graph
    (its time is then not a step cost) and, for gamma 0, how many dense steps it ran. Dense chunks are observed once
    the GPU finished them, later than they ran, unless the controller's `needs_timing` says it cannot decide
    without them."""

    def __init__(self, max_gamma: int, decay: float = 0.5):
        self.max_gamma, self.decay, self.mean = max_gamma, decay, float(max_gamma)

    def next(self, context: float, active: int | None = None) -> int:
        return max(1, min(self.max_gamma, math.floor(self.mean) + 1))

    def observe(self, gamma: int, accepted: list[int], seconds: float, captured: bool, dense_steps: int = 0) -> None:
        if accepted:
            self.mean = self.decay * self.mean + (1 - self.decay) * sum(accepted) / len(accepted)


class RoundLog:
    """What both speculative loops record per round: each sequence's emitted tokens, and the accepted counts of
    the sequences still generating (a finished sequence idles until the batch is done; its rounds do not count).
    Tokens of dense steps may stay on the device until something needs their values (`extend_later`), so a
    run of dense chunks never waits for the GPU; lengths are known on the host all along."""

    def __init__(self, first_tokens: list[int], params: GenerationParams, max_gamma: int):
        self.out = [[t] for t in first_tokens]
        self.params = params
        self.accepted: list[int] = []
        self.rounds_by_sequence = [0] * len(first_tokens)   # speculative rounds each took (a fixed batch waits
        self.max_gamma = max_gamma                          # for the most: the straggler effect)
        self.drafted = 0
        self._pending: list[tuple[torch.Tensor, list[bool]]] = []
        self._pending_len = [0] * len(first_tokens)

    def lengths(self) -> list[int]:
        return [len(o) + p for o, p in zip(self.out, self._pending_len, strict=True)]

    def finished(self) -> bool:
        stop = self.params.stop_token_ids
        if min(self.lengths()) >= self.params.max_new_tokens:
            return True
        if not stop:
            return False
        self.flush()
        return all(any(t in stop for t in o) for o in self.out)

    def done(self) -> list[bool]:
        """Sequences that already have their tokens (call before record)."""
        return [n >= self.params.max_new_tokens for n in self.lengths()]

    def record(self, accepted: list[int], emitted: list[list[int]], done: list[bool], gamma: int) -> None:
        self.flush()
        for i, (row, a, d, o) in enumerate(zip(emitted, accepted, done, self.out, strict=True)):
            if not d:
                o.extend(x for x in row if x >= 0)
                self.accepted.append(a)
                self.drafted += gamma
                self.rounds_by_sequence[i] += 1

    def extend_later(self, emitted: torch.Tensor, done: list[bool]) -> None:
        """Tokens of plain decoding steps, [batch, n] on the device: no drafts, nothing accepted or rejected."""
        self._pending.append((emitted, done))
        self._pending_len = [p + (0 if d else emitted.shape[1]) for p, d in zip(self._pending_len, done, strict=True)]

    def flush(self) -> None:
        for emitted, done in self._pending:
            for row, d, o in zip(emitted.tolist(), done, self.out, strict=True):
                if not d:
                    o.extend(row)
        self._pending.clear()
        self._pending_len = [0] * len(self.out)

    def tokens(self) -> list[list[int]]:
        self.flush()
        return [cut_at_stop(o[: self.params.max_new_tokens], self.params.stop_token_ids) for o in self.out]

    def mean_accepted_len(self) -> float:
        return 1 + sum(self.accepted) / max(1, len(self.accepted))      # incl. the bonus token

    def stats(self) -> dict:
        return {"mean_accepted_len": self.mean_accepted_len(),
                "acceptance_rate": sum(self.accepted) / max(1, self.drafted),
                "acceptance_per_position": [sum(a > i for a in self.accepted) / max(1, len(self.accepted))
                                            for i in range(self.max_gamma)],
                "rounds_by_sequence": list(self.rounds_by_sequence)}


AR_CHUNK = 64   # dense steps per controller decision when it chooses plain decoding (gamma 0)
# With a fixed gamma and a policy that selects inside the draft graph, each round may queue the next round's drafts
# before its sync (_Loop._queue_next_draft), so that the GPU drafts while the host does its bookkeeping. Off until
# timed: its first version (3acc45f) read the accepted tokens with tolist(), which waited for the queued drafts too,
# and measured 1-2% slower than without (1.5B, b64 x 32K, H100); the read-back through an event (4bef2cc) is tested
# for tokens but not yet timed on a GPU.
PIPELINE_DRAFTS = False


@torch.no_grad()
def generate_self_speculative(model: Transformer, cache: PagedKVCache, prompts: list[list[int]],
                              params: GenerationParams, policy: SelectionPolicy | dict[str, SelectionPolicy],
                              gamma: int = 4, steps: dict | RoundSteps | None = None, adaptive_gamma: bool = False,
                              controller=None) -> GenerationResult:
    """Generate up to `params.max_new_tokens` tokens per prompt with gamma drafts per round.

    adaptive_gamma: at most gamma drafts, chosen each round by AdaptiveGamma. controller: any object with
    AdaptiveGamma's interface (auto.CostModel chooses between gamma and 0, plain dense steps). `policy` may be
    several policies by name; the controller's next() then returns (gamma, name) to pick one per round. `steps`:
    the runner an earlier run of the same model, cache, policies, batch and sampling returned, to skip graph
    capture."""
    if gamma <= 0:
        raise InvalidInputError(f"gamma (draft tokens per round) must be > 0, got {gamma}")
    check_prompts(model, cache, prompts, cache_tokens_needed(0, params.max_new_tokens, gamma))
    policies = dict(policy) if isinstance(policy, dict) else {policy.name: policy}
    for p in policies.values():
        p.check_context(max(len(q) for q in prompts))
    device, sampling = cache.device, params.sampling
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    prepare_graphs(model, cache, params.use_cuda_graph)
    _sync(device)
    t0 = time.perf_counter()
    next_tok = agree(sample(prefill(model, cache, prompts, params.prefill_chunk), sampling, generator), model, sampling)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    if isinstance(steps, RoundSteps):
        steps = {(steps.policy.name, steps.gamma): steps}
    loop = _Loop(model, cache, params, generator, next_tok, gamma, dict(steps or {}))
    controller = controller or (AdaptiveGamma(gamma) if adaptive_gamma else None)
    for p in policies.values():
        p.reset(cache)
    default = next(iter(policies))
    gammas, unobserved = [], []
    full_batch = FullBatchRate(time.perf_counter())
    while not loop.log.finished():
        full_batch.round_begins(loop.log)
        choice = (controller.next(sum(cache.host_lens()) / len(prompts), sum(not d for d in loop.log.done()))
                  if controller else gamma)
        g, name = choice if isinstance(choice, tuple) else (choice, default)
        first_mark, graphs_before = len(loop.timer.marks), loop.graph_count()
        if g == 0:
            accepted, n_dense = [], loop.dense_steps()
        else:
            accepted, n_dense = loop.speculate(g, policies[name], pipeline=PIPELINE_DRAFTS and not controller), 0
        gammas.append(g)
        if controller:
            unobserved.append((choice, accepted, first_mark, len(loop.timer.marks),
                               loop.graph_count() != graphs_before, n_dense))
            _observe(controller, loop.timer, unobserved)
        full_batch.round_ends(loop.log, time.perf_counter())
    _sync(device)
    total = time.perf_counter() - t0
    if controller:
        _observe(controller, loop.timer, unobserved, finished=True)   # the last chunks, for what it keeps
    tokens = loop.log.tokens()
    new = sum(len(t) for t in tokens)
    rounds = sum(g > 0 for g in gammas)
    return GenerationResult(tokens, {
        "method": "self-spec:" + "+".join(policies), "gamma": gamma, "new_tokens": new, "total_s": total,
        "tokens_per_s": new / total, "prefill_s": prefill_s,
        "decode_tokens_per_s": (new - len(prompts)) / max(total - prefill_s, 1e-9), "rounds": rounds,
        # A fixed batch waits for its slowest sequence; with requests refilling finished slots (continuous
        # batching) every round would run as the rounds before the first sequence finished.
        "decode_tokens_per_s_steady": full_batch.rate((new - len(prompts)) / max(total - prefill_s, 1e-9)),
        "full_batch_rounds": full_batch.rounds,
        **loop.log.stats(),
        "gamma_mean": sum(gammas) / max(1, len(gammas)), "gamma_min": min(gammas, default=gamma),
        "dense_step_chunks": len(gammas) - rounds, "dense_steps": loop.dense_step_count,
        "kv_bytes_read_prefill_and_verify": cache.kv_bytes_read, "kv_bytes_read_draft": int(loop.draft_bytes),
        **loop.timer.totals(),
    }, loop.steps)


def _observe(controller, timer: PhaseTimer, unobserved: list, finished: bool = False) -> None:
    """Hand the controller each finished round's measurements, in order. A dense chunk's time is known once the
    GPU got past it: observed then, without waiting, unless the controller cannot decide without it (or the
    run is over)."""
    while unobserved:
        end_mark = unobserved[0][3]
        if not finished and not timer.complete(end_mark):
            if not getattr(controller, "needs_timing", False):
                return
            timer.wait(end_mark)
        g, accepted, first, last, captured, n = unobserved.pop(0)
        controller.observe(g, accepted, timer.seconds(first, last), captured, n)


class _Loop:
    """State the rounds of one run share: the cache, the token log, the step graphs by (policy name, gamma) (0: the
    dense decode StepRunner), the RNG and the last emitted token of every sequence."""

    def __init__(self, model, cache, params: GenerationParams, generator, next_tok, max_gamma: int, steps: dict):
        self.model, self.cache, self.params, self.generator = model, cache, params, generator
        self.batch, self.next_tok, self.steps = next_tok.shape[0], next_tok, steps
        self.timer = PhaseTimer(cache.device)
        self.log = RoundLog(next_tok.tolist(), params, max_gamma)
        self.draft_bytes = torch.zeros((), dtype=torch.long, device=cache.device)
        self.dense_step_count = 0
        self._queued = None       # (drafts, draft distributions, selection) queued for the next round

    def round_steps(self, g: int, policy: SelectionPolicy) -> RoundSteps:
        key, p = (policy.name, g), self.params
        s = self.steps.get(key)
        if s is None or not s.fits(self.model, self.cache, policy, self.batch, g, p.sampling):
            s = self.steps[key] = RoundSteps(self.model, self.cache, policy, self.batch, g, p.sampling,
                                             p.use_cuda_graph)
        s.policy = policy      # an earlier run's policy of equal settings: the graphs serve this run's object
        return s

    def graph_count(self) -> int:
        return sum(s.graph_count() for s in self.steps.values())

    def speculate(self, g: int, policy: SelectionPolicy, pipeline: bool = False) -> list[int]:
        """One round: select, g sparse drafts, dense verify, accept. Returns the accepted counts of the sequences
        still generating. pipeline (a fixed gamma and policy for the whole run): when the policy selects on the
        device, the next round's drafts are queued before this round's one sync (see _queue_next_draft)."""
        cache, sampling, timer = self.cache, self.params.sampling, self.timer
        round_steps = self.round_steps(g, policy)
        pipeline = pipeline and round_steps.device_select_width is not None and policy.device_lists_always_fit
        # Sequences that already have their tokens step with the batch (outputs dropped) while the others catch
        # up: idle, they keep their length and their attention reads only the new block.
        done = self.log.done()
        reserved = 2 * (g + 1) if pipeline else g + 1       # this round's tokens, and the next drafts' if queued
        start_lens = self._room_for_done(cache.host_lens(), done, reserved)
        cache.mark_idle(done)
        queued, self._queued = self._queued, None
        if queued is not None:                 # drafted during the last round's sync (their time already marked)
            cache.reserve(reserved)
            drafts_t, draft_probs, selection = queued
        else:
            drafts_t, draft_probs, selection = self._draft(round_steps, policy, g, reserved)
        self.draft_bytes += _draft_bytes_read(cache, selection, start_lens, g)

        t = timer.start()
        fresh = policy.mass_this_round()
        target_logits = round_steps.verify(torch.cat([self.next_tok[:, None], drafts_t], dim=1), fresh,
                                           active=done.count(False))
        cache.advance(g + 1)
        cache.count_read(sum(n for n, d in zip(start_lens, done, strict=True) if not d) + self.batch * (g + 1))
        if sampling.greedy:
            accepted, emitted = accept_greedy(drafts_t, target_logits)
        else:
            accepted, emitted = accept_sampling(drafts_t, draft_probs, probabilities(target_logits, sampling),
                                                self.generator)
            agree(accepted, self.model, sampling)
            agree(emitted, self.model, sampling)
        timer.stop("verify_s", t)
        done_t = to_device(done, torch.bool, cache.device)
        self.next_tok = torch.where(done_t, self.next_tok, emitted.gather(1, accepted[:, None]).squeeze(1))
        if round_steps.page_mass is not None and fresh:
            policy.observe(round_steps.page_mass)
        result = torch.cat([accepted[:, None], emitted], dim=1)
        queue_next = pipeline and not self._may_finish(g)
        if queue_next:
            read_back = _to_host_later(result)
            self._queue_next_draft(round_steps, policy, g, accepted, done_t)
            host = read_back()      # the round's one sync: up to this round's accept, not the drafts queued after
        else:
            host = result.tolist()  # the round's one sync
        accepted_list = [row[0] for row in host]
        new_lens = [n if d else n + 1 + a for n, a, d in zip(start_lens, accepted_list, done, strict=True)]
        cache.truncate(new_lens, spare_tokens=g + 1 if queue_next else 0, lens_on_device=queue_next)
        if round_steps.token_scores is not None and fresh:
            policy.observe_token_scores(round_steps.token_scores, start_lens)
        self.log.record(accepted_list, [row[1:] for row in host], done, g)
        return [a for a, d in zip(accepted_list, done, strict=True) if not d]

    def _draft(self, round_steps: RoundSteps, policy: SelectionPolicy, g: int, reserved: int):
        """Select and draft g tokens for every sequence (reserving `reserved` tokens' pages first; 0: they are
        reserved already): (drafts, draft distributions, selection)."""
        cache, timer = self.cache, self.timer
        width = round_steps.device_select_width
        if width is not None and policy.fits_device_lists(cache, g, width):   # selection inside the draft graph
            t = timer.start()
            if reserved:
                cache.reserve(reserved)
            out = round_steps.draft_selecting(self.next_tok, self.generator)
        else:
            t = timer.start()
            selection = policy.select(cache, g)
            timer.stop("select_s", t)
            t = timer.start()
            if reserved:
                cache.reserve(reserved)
            out = (*round_steps.draft(selection, self.next_tok, self.generator), selection)
        timer.stop("draft_s", t)
        return out

    def _queue_next_draft(self, round_steps: RoundSteps, policy: SelectionPolicy, g: int, accepted: torch.Tensor,
                          done: torch.Tensor) -> None:
        """Queue the next round's drafts before this round's sync, so that the GPU drafts while the host reads the
        accepted tokens and does its bookkeeping (without this it idles then: ~0.7 ms of a 35 ms round on the 1.5B at
        b64 x 32K, H100). It needs only device state: the lengths are moved to the accepted ones on the device (the
        host follows after the sync), the next tokens are already there, the policy selects inside the draft graph,
        and this round reserved pages for the next round's tokens too. Sequences that finish this round draft once
        more (outputs dropped); the next round marks them idle before its verify."""
        cache = self.cache
        cache.lens[: self.batch] -= torch.where(done, g + 1, g - accepted).to(torch.int32)
        self._queued = self._draft(round_steps, policy, g, 0)

    def _may_finish(self, g: int) -> bool:
        """Whether this round may give every sequence its tokens (then no next drafts are queued). Stop tokens can
        end a run earlier: a round's queued drafts are then unused."""
        lengths, done = self.log.lengths(), self.log.done()
        return min((n for n, d in zip(lengths, done, strict=True) if not d), default=0) + g + 1 \
            >= self.params.max_new_tokens

    def _room_for_done(self, start_lens: list[int], done: list[bool], n: int) -> list[int]:
        """A sequence that has its tokens still steps with the batch (its outputs are dropped). After dense steps
        one that got ahead can sit at the end of the cache: it steps over its own last positions instead."""
        capacity = self.cache.max_pages_per_seq * self.cache.page_size
        if any(d and s + n > capacity for s, d in zip(start_lens, done, strict=True)):
            start_lens = [min(s, capacity - n) if d else s for s, d in zip(start_lens, done, strict=True)]
            self.cache.truncate(start_lens)
        return start_lens

    def dense_steps(self) -> int:
        """Plain AR decoding for a few steps, as generate_ar does them, without waiting for the GPU (the tokens
        are read when something needs them). The count keeps every sequence within the cache and stops once
        the slowest sequence has its tokens."""
        cache, sampling = self.cache, self.params.sampling
        runner = self.steps.get(0)
        if runner is None:
            runner = self.steps[0] = StepRunner(self.model, cache, self.params.use_cuda_graph)
        start_lens, done, lengths = cache.host_lens(), self.log.done(), self.log.lengths()
        capacity = cache.max_pages_per_seq * cache.page_size
        room = capacity - max(s for s, d in zip(start_lens, done, strict=True) if not d)
        missing = self.params.max_new_tokens - min(n for n, d in zip(lengths, done, strict=True) if not d)
        n = max(1, min(AR_CHUNK, room, missing)) if runner.ready(self.batch, 1) else 1   # 1: the capture step
        start_lens = self._room_for_done(start_lens, done, n)
        cache.mark_idle(done)
        t = self.timer.start()
        cache.reserve(n)
        out, tok = [], self.next_tok
        for _ in range(n):
            tok = decode_step(self.model, cache, runner, tok, sampling, self.generator)
            out.append(tok)
        self.timer.stop("ar_steps_s", t)
        cache.truncate([s if d else s + n for s, d in zip(start_lens, done, strict=True)])
        self.log.extend_later(torch.stack(out, dim=1), done)     # no sync: the next chunk queues behind this one
        self.next_tok = torch.where(to_device(done, torch.bool, cache.device), self.next_tok, tok)
        self.dense_step_count += n
        return n


def _to_host_later(t: torch.Tensor):
    """A function that returns t's values as lists. On CUDA the copy to (pinned) host memory is queued now and
    waited for by an event, so that reading it does not also wait for kernels queued after this call (a plain
    tolist() would wait for the whole stream)."""
    if not t.is_cuda:
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()
    return wait


def _draft_bytes_read(cache: PagedKVCache, selection, start_lens: list[int], gamma: int) -> int | torch.Tensor:
    """KV bytes the gamma draft steps read: the selected pages (counted whole) for sparse layers, every token
    so far for dense ones. A device scalar when a selection is involved."""
    layer_bytes = cache.bytes_per_token // cache.cfg.num_layers          # one token, one layer, all KV heads
    dense_tokens = sum(n * gamma + gamma * (gamma + 1) // 2 for n in start_lens)   # over the gamma steps
    if selection is None:
        return dense_tokens * cache.bytes_per_token
    head_bytes = layer_bytes // cache.cfg.num_kv_heads
    sparse = selection.tokens_selected(cache.page_size) * head_bytes * gamma
    return dense_tokens * layer_bytes * len(selection.dense_layers) + sparse
