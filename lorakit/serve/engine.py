"""The serving engine: continuous batching of generation requests over one model and many adapters.

A scheduler thread owns the model. Between decode steps it runs queued commands (load or unload an
adapter), admits waiting requests into the running batch (each prompt is prefilled alone, into its own KV
cache), then advances every running request by one token in a single forward pass. Rows of that pass use
different adapters (`adapter_names`: each row's own A, B), and each row attends only over its own cache
(see attention.py), so a request's greedy output is the same alone or in any batch.

    engine = Engine(model, tokenizer, max_batch=16)
    engine.start()
    tokens = engine.generate(prompt_ids, adapter="legal", params=SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..lora.layer import BASE_ADAPTER
from .attention import (ATTENTION_NAME, STEP_ROWS, SequenceKV, StepRows, batch_invariant_multiple,
                        register_ragged_attention)


SHUTTING_DOWN = "the server is shutting down"  # the error every unfinished request gets when the engine stops


@dataclass
class SamplingParams:
    """How one request picks tokens. temperature 0 = greedy (exact and batch-independent)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None


@dataclass
class Sequence:
    """A request while the engine holds it."""

    id: int
    prompt: list[int]
    adapter: str
    params: SamplingParams
    emit: Callable[[str, object], None]
    """emit("token", id) per new token, then emit("done", "stop" | "length") or emit("error", message)."""
    generated: list[int] = field(default_factory=list)
    kv: Optional[SequenceKV] = None
    generator: Optional[torch.Generator] = None
    cancelled: bool = False


class RequestHandle:
    """What `Engine.submit` returns: cancel() drops the request at the next step (client went away)."""

    def __init__(self, seq: Sequence):
        self._seq = seq

    def cancel(self) -> None:
        self._seq.cancelled = True


class Engine:
    """Continuous-batching generation over `model` (a PeftModel or a plain causal LM) on one thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, eos_token_ids: Optional[list[int]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._admitted: list[Sequence] = []  # taken from _waiting, not yet through prefill
        self._commands: list[tuple[Callable[[], object], Future]] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.max_rows_seen = 0
        self._prepare_model()

    # ------------------------------------------------------------------ set-up
    def _prepare_model(self) -> None:
        register_ragged_attention()
        inner = _transformers_model(self.model)
        inner.set_attn_implementation(ATTENTION_NAME)
        inner.eval()
        weight = inner.get_input_embeddings().weight  # (vocab, hidden)
        self.device, self.dtype, self.vocab_size = weight.device, weight.dtype, weight.shape[0]
        self._probed: dict = {}
        self._probe_row_multiple()

    def _probe_row_multiple(self) -> None:
        """Rows per decode batch come in multiples of this, probed on every matrix a decode step multiplies
        by: again after each command, since a new adapter brings factors of new shapes."""
        self.row_multiple = batch_invariant_multiple(
            (p for p in self.model.parameters() if p.dim() == 2 and p.is_floating_point()), probed=self._probed)

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------------ API (any thread)
    def submit(self, prompt: list[int], adapter: str, params: SamplingParams,
               emit: Callable[[str, object], None]) -> RequestHandle:
        """Queue a request; `emit` is called from the engine thread with its tokens and its end."""
        seq = Sequence(next(self._ids), list(prompt), adapter, params, emit)
        if params.temperature > 0:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(63))
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify_all()
        return RequestHandle(seq)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps (adapter changes); its result or error in the Future."""
        future: Future = Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future

    def adapters_in_use(self) -> set[str]:
        with self._cond:
            return {s.adapter for s in self._requests()}

    def load(self) -> int:
        """Requests waiting, in prefill or running now."""
        with self._cond:
            return len(self._requests())

    def _requests(self) -> list[Sequence]:
        """Every request the engine holds, once each (one moving from prefill to running may be in both lists)."""
        return list({s.id: s for s in itertools.chain(self._waiting, self._admitted, self._running)}.values())

    def generate(self, prompt: list[int], adapter: str = BASE_ADAPTER,
                 params: Optional[SamplingParams] = None) -> tuple[list[int], str]:
        """Blocking: (generated token ids, finish reason). For scripts, tests and benchmarks."""
        events: queue.Queue = queue.Queue()
        self.submit(prompt, adapter, params or SamplingParams(), lambda kind, value: events.put((kind, value)))
        tokens: list[int] = []
        while True:
            kind, value = events.get()
            if kind == "token":
                tokens.append(value)
            elif kind == "error":
                raise RuntimeError(value)
            else:
                return tokens, value

    # ------------------------------------------------------------------ the scheduler
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._commands or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
                while self._waiting and len(self._running) + len(self._admitted) < self.max_batch:
                    self._admitted.append(self._waiting.popleft())
            for fn, future in commands:
                _run_command(fn, future)
            if commands:
                self._probe_row_multiple()
            with torch.no_grad():
                for seq in list(self._admitted):
                    self._guarded([seq], self._prefill)
                    with self._cond:
                        self._admitted.remove(seq)
                self._running = [s for s in self._running if not s.cancelled]
                if self._running:
                    self._guarded(list(self._running), self._decode)
        for seq in self._requests():
            with contextlib.suppress(Exception):  # the client's event loop may be gone already
                seq.emit("error", SHUTTING_DOWN)

    def _guarded(self, seqs: list[Sequence], step: Callable[[list[Sequence]], None]) -> None:
        """Run a step; if it fails, fail its requests (with the reason) and keep serving the others."""
        try:
            step(seqs)
        except Exception as e:  # noqa: BLE001 - one bad step must not stop the server
            for seq in seqs:
                seq.emit("error", f"generation failed: {type(e).__name__}: {e}")
                seq.cancelled = True
            self._running = [s for s in self._running if not s.cancelled]

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Process one new prompt alone (a 1-row batch) and pick its first token."""
        (seq,) = seqs
        if seq.cancelled:
            return
        seq.kv = SequenceKV(len(seq.prompt) + seq.params.max_tokens)
        ids = torch.tensor([seq.prompt], device=self.device)  # (1, prompt)
        positions = torch.arange(len(seq.prompt), device=self.device)[None]  # (1, prompt)
        logits = self._forward(ids, positions, [seq])  # (1, vocab)
        if self._advance(seq, logits[0]):
            self._running.append(seq)

    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for every running request, in one forward pass padded to the invariant row multiple."""
        rows: list[Optional[Sequence]] = list(seqs)
        rows += [None] * (-len(rows) % self.row_multiple)
        ids = torch.tensor([[s.generated[-1] if s else self.pad_id] for s in rows], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.kv.length if s else 0] for s in rows], device=self.device)  # (B, 1)
        logits = self._forward(ids, positions, rows)  # (B, vocab)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(seqs))
        self._running = [seq for i, seq in enumerate(seqs) if self._advance(seq, logits[i])]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: list[Optional[Sequence]]) -> torch.Tensor:
        """Last-position logits (batch, vocab) of the model, each row through its own adapter and cache."""
        step = StepRows([s.kv if s else None for s in rows])
        extra = {}
        if hasattr(self.model, "peft_config"):
            extra["adapter_names"] = [s.adapter if s else BASE_ADAPTER for s in rows]
        token = STEP_ROWS.set(step)
        try:
            out = self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, **extra)
        finally:
            STEP_ROWS.reset(token)
        if not step.layers_seen:
            raise RuntimeError(f"{type(_transformers_model(self.model)).__name__} does not use transformers' "
                               "attention interface, which lorakit serve needs")
        return out.logits[:, -1].float()

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Pick and emit the next token of `seq`; True while it goes on."""
        if seq.cancelled:
            return False
        token = _pick(logits, seq.params, seq.generator)
        if token in self.eos_token_ids:
            seq.emit("done", "stop")
            return False
        seq.generated.append(token)
        seq.emit("token", token)
        if len(seq.generated) >= seq.params.max_tokens:
            seq.emit("done", "length")
            return False
        return True


def _pick(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """Greedy (argmax, first of ties) or temperature + nucleus sampling for one row of logits (vocab,)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    # On the CPU in float64 (any positive JSON temperature stays positive there; MPS has no float64), shifted
    # so the largest logit is 0: a temperature as small as 1e-300 then gives 0 and -inf (greedy, in effect)
    # where float32 would divide by a zero and give NaN.
    logits = logits.cpu().double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _run_command(fn: Callable[[], object], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
        future.set_exception(e)


def _transformers_model(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the generation config, the model config and the tokenizer."""
    inner = _transformers_model(model)
    ids: set[int] = set()
    for source in (getattr(inner, "generation_config", None), getattr(inner, "config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
