"""Batched greedy generation for ``muscle-eval predict`` (GSM8K, SAMSum).

What ``model.generate`` (and lm-eval's ``generate_until``, which calls it) does, greedy decoding
until a stop string, EOS or ``max_new_tokens``, with three changes that make a window of
prompts cheaper on a CPU, where a decoding step streams the weights and the whole KV cache:

* **Rows are refilled.** ``generate`` runs a batch until its *longest* row is done, the
  finished rows padding along. Here each of the ``batch_size`` slots takes the next prompt (of
  the window, longest first) as soon as its row is done, and slots are dropped once the queue
  is empty, so every step works on live rows.
* **The KV cache is a buffer written in place** (:class:`SlotCache`). transformers'
  ``DynamicCache`` concatenates each step's keys and values, copying the whole cache per
  token; the buffer grows by doubling and attention reads a view of it.
* **A prefix shared by every prompt of the window is encoded once** (the few-shot prefix with
  ``--fewshot-sampler first_n``; :data:`MIN_SHARED_PREFIX` tokens at least) and copied into
  each row's cache. Per-example random shots (the default) share nothing but "Question:", so
  there is nothing to share there.

Stop strings are checked per row on the decoded tail of its new tokens, and the text is cut
at the first stop string (lm-eval's ``until``) or EOS. ``no_repeat_ngram_size`` bans, like
transformers' ``NoRepeatNGramLogitsProcessor``, every token that would repeat an n-gram of the
row's prompt and generation. A non-finite logit is a :class:`MuscleError`.

A row's tokens depend only on its prompt up to floating-point rounding, which depends on the
batch it shares steps with: the schedule is a deterministic function of the prompt list, so a
window computes bit-identical text every time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from muscle import MuscleError
from muscle.eval_scoring import device_of
from muscle.forward import unwrap_model

# Encode a prefix once only if it is at least this long (below, the extra copies cost more
# than the tokens saved).
MIN_SHARED_PREFIX = 32


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's ``until``)."""
    cut = len(text)
    for stop in stop_strings:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


# ---------------------------------------------------------------------------- KV cache


class _SlotLayer(DynamicLayer):
    """One layer's keys and values for every slot, (S, H, capacity, hd), in a buffer written in
    place. The first ``n`` columns are in use; each slot's tokens fill its last columns."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._k, self._v, self.n = keys, values, 0
        self.is_initialized = True
        self.device = keys.device
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self.n], self._v[:, :, : self.n]

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist already
        pass

    def reserve(self, n: int) -> None:
        if n > self._k.shape[2]:
            cap = max(n, 2 * self._k.shape[2])
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_zeros((*old.shape[:2], cap, old.shape[3]))
                new[:, :, : self.n] = old[:, :, : self.n]
                setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        q = key_states.shape[2]
        self.reserve(self.n + q)
        self._k[:, :, self.n : self.n + q] = key_states
        self._v[:, :, self.n : self.n + q] = value_states
        self.n += q
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.n

    def shift(self, by: int) -> None:
        """Move the used columns ``by`` to the right (``by`` > 0: room on the left) or left."""
        if by > 0:
            self.reserve(self.n + by)
        for buf in (self._k, self._v):
            if by > 0:
                buf[:, :, by : by + self.n] = buf[:, :, : self.n].clone()
            else:
                buf[:, :, : self.n + by] = buf[:, :, -by : self.n].clone()
        self.n += by
        self._view()

    def put(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one sequence's (1, H, L, hd) keys and values into the last L columns of a slot."""
        L = keys.shape[2]
        self._k[slot, :, self.n - L : self.n] = keys[0]
        self._v[slot, :, self.n - L : self.n] = values[0]

    def keep_slots(self, idx: torch.Tensor) -> None:
        self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)
        self._view()


class SlotCache(Cache):
    """A transformers ``Cache`` of ``slots`` rows, right-aligned: every row's newest token is in
    the last column; a row that is shorter than the cache is masked on the left."""

    def __init__(self, prefill_layers: Sequence[tuple[torch.Tensor, torch.Tensor]], slots: int):
        layers = []
        for k, v in prefill_layers:  # (1, H, L, hd): shapes and dtype of the model's KV
            shape = (slots, k.shape[1], max(256, 2 * k.shape[2]), k.shape[3])
            layers.append(_SlotLayer(k.new_zeros(shape), v.new_zeros(shape)))
        super().__init__(layers=layers)

    @property
    def n(self) -> int:
        return self.layers[0].n

    def shift(self, by: int) -> None:
        for layer in self.layers:
            layer.shift(by)

    def put(self, slot: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.put(slot, k, v)

    def keep_slots(self, idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_slots(idx)


def _layers_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


_FORWARD_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(model) -> frozenset[str]:
    cls = type(unwrap_model(model))
    if cls not in _FORWARD_PARAMS:
        _FORWARD_PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMS[cls]


def _cache_kwargs(model, cache: Cache) -> dict:
    # transformers renamed past_key_values to cache (5.x; the old name is deprecated).
    name = "cache" if "cache" in _forward_params(model) else "past_key_values"
    return {name: cache, "use_cache": True}


# ------------------------------------------------------------------------------ engine


class _NgramBan:
    """Tokens that would complete an n-gram already in a sequence (no_repeat_ngram_size)."""

    def __init__(self, n: int, tokens: Sequence[int]) -> None:
        self.n = n
        self.seen: dict[tuple[int, ...], set[int]] = {}
        self.tokens: list[int] = []
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            gram = self.tokens[-self.n :]
            self.seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self) -> list[int]:
        if len(self.tokens) < self.n - 1:
            return []
        return sorted(self.seen.get(tuple(self.tokens[len(self.tokens) - self.n + 1 :]), ()))


class _Row:
    def __init__(self, index: int, prompt: list[int], ngram: int) -> None:
        self.index = index
        self.length = len(prompt)  # tokens in the cache (prompt + generated, fed so far)
        self.new: list[int] = []
        self.ban = _NgramBan(ngram, prompt) if ngram else None


class GreedyDecoder:
    """Greedy continuations of token prompts; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        stop_strings: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        no_repeat_ngram_size: int = 0,
        eos_ids: Sequence[int] = (),
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stops = [s for s in stop_strings if s]
        # A stop string of c characters spans at most c tokens (a few more for tokens that
        # decode to nothing): the decoded tail of that many tokens shows it.
        self.lookback = max((len(s) for s in self.stops), default=0) + 4
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.ngram = no_repeat_ngram_size
        self.eos = set(eos_ids)
        self.device = device_of(model)
        self.one_row = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}

    # -- model calls
    @torch.inference_mode()
    def _prefill(self, tokens: list[int], start: int, past) -> tuple[torch.Tensor, list]:
        """Run ``tokens`` (positions start..) after ``past`` (a cache or None): the last
        position's logits (V,) and the per-layer KV of the whole sequence."""
        # Full-attention layers throughout (a sliding-window model's masks still apply the
        # window): the per-layer KV then all have the sequence's length, as SlotCache expects.
        cache = Cache(layer_class_to_replicate=DynamicLayer)
        for i, (k, v) in enumerate(past or ()):
            cache.update(k, v, i)  # a copy: the shared prefix stays untouched
        ids = torch.tensor([tokens], device=self.device)  # (1, L)
        pos = torch.arange(start, start + len(tokens), device=self.device)[None]  # (1, L)
        mask = torch.ones((1, start + len(tokens)), dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            **self.one_row,
            **_cache_kwargs(self.model, cache),
        )
        return out.logits[0, -1], _layers_kv(cache)

    @torch.inference_mode()
    def _step(self, cache: SlotCache, rows: list[_Row]) -> torch.Tensor:
        """Feed each row's last token: the next logits, (S, V)."""
        n = cache.n
        ids = torch.tensor([[r.new[-1]] for r in rows], device=self.device)  # (S, 1)
        lengths = torch.tensor([r.length for r in rows], device=self.device)  # (S,)
        # Columns n - length .. n - 1 hold a row's earlier tokens; column n takes this one.
        cols = torch.arange(n + 1, device=self.device)[None, :]  # (1, n + 1)
        mask = (cols >= (n - lengths)[:, None]).long()  # (S, n + 1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=lengths[:, None],
            **self.one_row,
            **_cache_kwargs(self.model, cache),
        )
        return out.logits[:, -1]  # (S, V)

    # -- token choice and stopping
    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Greedy tokens for ``rows`` from their logits (S, V), n-gram bans applied."""
        logits = logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise MuscleError(
                "the model produced non-finite logits (NaN or inf) while generating: its "
                "weights or dtype are broken (try --dtype float32)"
            )
        for s, r in enumerate(rows):
            if r.ban is not None and (banned := r.ban.banned()):
                logits[s, banned] = float("-inf")
        return logits.argmax(dim=-1).tolist()

    def _accept(self, row: _Row, token: int) -> bool:
        """Append ``token`` to the row; True if the row is done."""
        if token in self.eos:
            return True
        row.new.append(token)
        if row.ban is not None:
            row.ban.push(token)
        if len(row.new) >= self.max_new_tokens:
            return True
        if self.stops:
            tail = self.tokenizer.decode(row.new[-self.lookback :], skip_special_tokens=True)
            return any(s in tail for s in self.stops)
        return False

    # -- the loop
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        on_done: Callable[[int], None] | None = None,
    ) -> list[list[int]]:
        """New tokens of each prompt (EOS excluded), in prompt order. ``on_done(i)`` is called
        when prompt i is finished."""
        results: list[list[int]] = [[] for _ in prompts]
        if not prompts:
            return results
        if any(len(p) == 0 for p in prompts):
            raise MuscleError("cannot generate from an empty prompt")
        prefix_len = _common_prefix(prompts)
        shared = None
        if prefix_len >= MIN_SHARED_PREFIX:
            _, shared = self._prefill(list(prompts[0][:prefix_len]), 0, None)
        else:
            prefix_len = 0
        queue = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        queue.reverse()  # pop() takes the longest first
        cache: SlotCache | None = None
        rows: list[_Row | None] = []

        def start_row(slot: int | None) -> int | None:
            """Prefill prompts into ``slot`` (None: a new slot) until one is still running;
            the slot used, or None if the queue ran out."""
            nonlocal cache
            while queue:
                i = queue.pop()
                prompt = list(prompts[i])
                logits, kv = self._prefill(prompt[prefix_len:], prefix_len, shared)
                row = _Row(i, prompt, self.ngram)
                if self._accept(row, self._choose(logits[None], [row])[0]):
                    results[i] = row.new
                    if on_done:
                        on_done(i)
                    continue
                if cache is None:
                    cache = SlotCache(kv, self.batch_size)
                if len(prompt) > cache.n:
                    cache.shift(len(prompt) - cache.n)
                if slot is None:
                    slot = len(rows)
                    rows.append(None)
                cache.put(slot, kv)
                rows[slot] = row
                return slot
            return None

        for _ in range(self.batch_size):
            if start_row(None) is None:
                break
        if cache is not None and len(rows) < self.batch_size:  # fewer prompts than slots
            cache.keep_slots(torch.arange(len(rows), device=self.device))
        while rows:
            assert cache is not None
            live: list[_Row] = list(rows)  # type: ignore[arg-type]
            tokens = self._choose(self._step(cache, live), live)
            for r in live:
                r.length += 1
            finished = []
            for s, (r, t) in enumerate(zip(live, tokens, strict=True)):
                if self._accept(r, t):
                    results[r.index] = r.new
                    if on_done:
                        on_done(r.index)
                    if start_row(s) is None:
                        finished.append(s)
            if finished:
                keep = [s for s in range(len(rows)) if s not in set(finished)]
                rows = [rows[s] for s in keep]
                if rows:
                    cache.keep_slots(torch.tensor(keep, device=self.device))
            if rows:
                # Columns left of every row's start are dead: drop them once they are half.
                dead = cache.n - max(r.length for r in rows)  # type: ignore[union-attr]
                if dead > 0 and 2 * dead >= cache.n:
                    cache.shift(-dead)
        return results


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Leading tokens shared by all prompts, leaving each at least one token of its own."""
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts[1:]):
        n += 1
    return n


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    stop_strings: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    no_repeat_ngram_size: int = 0,
    max_length: int,
    on_done: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first stop string or EOS.

    A prompt keeps its last ``max_length - max_new_tokens`` tokens (lm-eval's truncation).
    """
    eos = tokenizer.eos_token_id
    stops = list(stop_strings) + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    room = max(1, max_length - max_new_tokens)
    encoded = [tokenizer(p)["input_ids"][-room:] for p in prompts]
    decoder = GreedyDecoder(
        model,
        tokenizer,
        stop_strings=stops,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        no_repeat_ngram_size=no_repeat_ngram_size,
        eos_ids=[eos] if eos is not None else [],
    )
    new = decoder.generate(encoded, on_done)
    return [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), stops) for t in new]
