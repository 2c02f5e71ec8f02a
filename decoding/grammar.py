"""Structured outputs: grammars compiled by llguidance, one matcher per constrained row.

A request's format (a JSON Schema, a regex, a choice, a grammar; `server.formats` turns the
wire fields into one llguidance grammar text) is compiled once per text against the family's
tokenizer over the shared vocabulary (`Grammars.compile`, cached by the text). Every row of the
request gets its own matcher, a copy of the compiled one, which follows the row's output token
by token (`Sequence.append`). Before each draw the engine asks the constrained rows' matchers
which tokens may come next (`GrammarMask.fill`, on the host, in parallel across rows) and the
sampler removes the others from the composed distribution.

llguidance bounds its own work (grammar size, lexer fuel per compile and per step: see
`LLParserLimits`), so neither a compile nor a step's mask can run away on a hostile grammar.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from .request import RequestValidationError

CACHE_SIZE = 128  # compiled grammars kept, by text (least recently used goes first)


def _summary(message: str, limit: int = 400) -> str:
    """llguidance's error on one line: its lines up to the state dump it may append, without
    the caret lines that point into the source (they only make sense as a block)."""
    kept = []
    for line in message.splitlines():
        line = line.strip()
        if line.startswith("<state>"):
            break
        if line and set(line) != {"^"}:
            kept.append(line)
    text = " ".join(kept) or "invalid grammar"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Grammars:
    """Compiles grammar texts for one family tokenizer and hands out row matchers.

    Thread-safe: the server compiles off its event loop, the engine thread copies matchers.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]):
        self._hf = tokenizer
        self.vocab = vocab_size
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # the llguidance tokenizer, built at the first grammar
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._executor: Any = None  # llguidance's thread pool for a batch's masks
        self.words = 0  # int32 words of one row's bitmask (the tokenizer's width, >= vocab)

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                n_vocab = max(self.vocab, len(self._hf))
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, n_vocab=n_vocab, eos_token=self._eos or None
                    )
                except Exception as exc:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
                    raise RequestValidationError(
                        f"structured outputs are not available for this tokenizer: {exc}",
                        param="response_format",
                    ) from exc
                self.words = (n_vocab + 31) // 32
            return self._tokenizer

    def compile(self, grammar: str, param: str = "response_format") -> Any:
        """The compiled matcher of `grammar` (llguidance grammar text), from the cache when it
        was compiled before. Raises `RequestValidationError` naming the problem."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
                return hit
        from llguidance import LLMatcher

        tok = self._llg_tokenizer()
        matcher = LLMatcher(tok, grammar, log_level=0)  # drops the GIL while it compiles
        if matcher.is_error():
            raise RequestValidationError(
                f"{param}: invalid format: {_summary(matcher.get_error())}", param=param
            )
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for one row (a copy of the compiled grammar's start state)."""
        return self.compile(grammar).deep_copy()

    def executor(self) -> Any:
        with self._lock:
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            return self._executor


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., W] int32 bitmasks (bit t of word w: token 32w + t allowed) -> [..., vocab] bool,
    True where a token is *not* allowed."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    allowed = (bits.unsqueeze(-1) >> shifts) & 1
    return allowed.flatten(-2)[..., :vocab] == 0


class GrammarMask:
    """The bitmask buffer of one batch membership: a host row per batch row, all ones for rows
    without a grammar; the constrained rows are refilled before each draw."""

    def __init__(self, grammars: Grammars, matchers: list[Any], device: torch.device):
        self.grammars = grammars
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.matchers = matchers
        self.device = device
        self.constrained = torch.zeros(len(matchers), dtype=torch.bool)
        self.constrained[self.rows] = True
        self.constrained = self.constrained.to(device)
        self.host = self.alloc(len(matchers))

    def alloc(self, rows: int) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.full((rows, self.grammars.words), -1, dtype=torch.int32, pin_memory=pin)

    def fill(self, host: torch.Tensor, pairs: list[tuple[Any, int]]) -> None:
        """Each (matcher, row): write the tokens the matcher allows next into `host[row]`."""
        if pairs:
            self.grammars.executor().unsafe_compute_mask_ptr(
                pairs, host.data_ptr(), self.grammars.words * 4, host.shape[0]
            )

    def disallowed(self) -> torch.Tensor:
        """[B, V] True where a constrained row's matcher rules a token out, for this step."""
        self.fill(self.host, [(self.matchers[i], i) for i in self.rows])
        return self.upload(self.host)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        return unpack(host.to(self.device, non_blocking=True), self.grammars.vocab)

    def renormalised(
        self, composed: torch.Tensor, disallowed: torch.Tensor, constrained: torch.Tensor
    ) -> torch.Tensor:
        """What a constrained row reports as its log-probs: the composed distribution over the
        tokens its grammar allows, renormalised (the distribution it samples from before
        temperature and the truncations); other rows keep theirs unchanged."""
        masked = torch.log_softmax(composed.masked_fill(disallowed, -torch.inf), dim=-1)
        return torch.where(constrained.unsqueeze(-1), masked, composed)


def no_continuation(matcher: Any) -> str:
    """The error of a row whose grammar admits none of the tokens it could sample."""
    why = _summary(matcher.get_error()) if matcher.is_error() else "no token fits"
    return f"the requested format admits no continuation of this output ({why})"


def _allows(host_row: torch.Tensor, token: int) -> bool:
    return bool((int(host_row[token >> 5]) >> (token & 31)) & 1)


class BlockMasks:
    """The grammar masks of one speculative block: for each constrained row, the tokens its
    grammar allows at every drafted position j (after t0, x_1 .. x_j) and at the bonus
    position. The matchers walk the drafts while they are drafted (the drafter samples from its
    masked distribution, so drafts fit) and are rolled back when the block is scored: the
    row's `append` then consumes what the verification accepted."""

    def __init__(self, mask: GrammarMask, kmax: int, batch: int):
        self.mask = mask
        self.b = batch
        self.host = mask.alloc((kmax + 1) * batch)
        self.walked = [0] * batch

    def _walk(self, i: int, j: int, token: int) -> bool:
        """Row i takes its draft x_j (drawn under the mask at position j - 1); False when the
        row must stop drafting: the draft does not fit, or the grammar is now complete."""
        matcher = self.mask.matchers[i]
        if not _allows(self.host[(j - 1) * self.b + i], token):
            return False
        if not matcher.consume_token(token):  # cannot happen for an allowed token
            return False
        self.walked[i] += 1
        return not matcher.is_stopped()

    def at(self, j: int, ks: list[int], previous: list[int] | None) -> torch.Tensor:
        """[b, V] what the grammars rule out at position j, for drafting x_(j+1). Rows still
        drafting first take x_j (`previous`, the host drafts of position j - 1); a row whose
        grammar completes, or admits nothing here, drafts no further (`ks[i] = j`)."""
        pairs = []
        for i in self.mask.rows:
            if ks[i] <= j:
                continue
            if j > 0 and not self._walk(i, j, previous[i]):
                ks[i] = j
                continue
            pairs.append((self.mask.matchers[i], j * self.b + i))
        self.mask.fill(self.host, pairs)
        for _, r in pairs:
            if not bool(self.host[r].any()):
                ks[r - j * self.b] = j
        return self.mask.upload(self.host[j * self.b : (j + 1) * self.b])

    def finish(self, ks: list[int], drafts: list[list[int]]) -> torch.Tensor:
        """The bonus masks (after each row's last draft), then every matcher back where the
        block started. Returns [kmax + 1, b, V]: what the grammars rule out at each position."""
        pairs = []
        for i in self.mask.rows:
            k = ks[i]
            if k > self.walked[i]:
                self._walk(i, k, drafts[i][k - 1])
            pairs.append((self.mask.matchers[i], k * self.b + i))
        self.mask.fill(self.host, pairs)
        for i in self.mask.rows:
            if self.walked[i]:
                self.mask.matchers[i].rollback(self.walked[i])
        return self.mask.upload(self.host).view(-1, self.b, self.mask.grammars.vocab)
