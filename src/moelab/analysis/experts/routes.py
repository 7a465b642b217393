"""What the routers decided, read off a model as text flows through it, and the measures
`moelab experts` reports: per-expert counts by domain and token class, co-activation,
router confidence, and how two models' routing differs.

Legend: L MoE layers, E experts, K experts per token, T routed tokens, D model dim,
V vocabulary, C token classes, G domains.

Counts are accumulated batch by batch and nothing per token is kept, so memory is
bounded by the vocabulary and the expert count, not by the length of the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ...model import Transformer
from ...moe.router import Routing

CLASSES = ("whitespace", "punctuation", "digits", "word start", "word continuation", "other")
WS, PUNCT, DIGITS, START, CONT, OTHER = range(len(CLASSES))
_LETTERS = -1  # a token of letters: word start or continuation, by its context
CONF_BINS = 20  # histogram of the top-1 gate over [0, 1]


@dataclass
class Captured:
    """One forward's routing at one MoE layer: the router's input (T, D) and decision."""

    x_TD: torch.Tensor
    routing: Routing


@contextmanager
def capture_routing(model: Transformer) -> Iterator[list[list[Captured]]]:
    """Record every router call of `model`: yields a list with one list per MoE layer,
    appended to on each forward (clear it between batches)."""
    moes = model.moe_layers()
    if not moes:
        raise ValueError("the model has no MoE layer: there is no routing to read")
    seen: list[list[Captured]] = [[] for _ in moes]

    def hook(i):
        def fn(_module, args, out):
            seen[i].append(Captured(args[0].detach(), out))

        return fn

    handles = [m.router.register_forward_hook(hook(i)) for i, m in enumerate(moes)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def classify_text(s: str) -> int:
    """The class of a token's decoded text, before context: whitespace, punctuation,
    digits, letters (word start or continuation, settled by `token_classes`) or other
    (empty, mixed letters and digits, undecodable bytes)."""
    core = s.strip()
    if not s or "\ufffd" in s:
        return OTHER
    if not core:
        return WS
    if core.isdigit():
        return DIGITS
    if all(not c.isalnum() and not c.isspace() for c in core):
        return PUNCT
    if all(c.isalpha() or c == "_" for c in core):
        return START if s[0].isspace() else _LETTERS
    return OTHER


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


@dataclass
class TokenTable:
    """Per token id: its text and what its class needs. A token of letters starts a word
    when it has its own leading space or follows a token that does not end in a letter,
    digit or '_' (or starts the sequence): so it works with or without space markers."""

    texts: list[str]
    base_V: np.ndarray  # int8 class before context (_LETTERS for letter tokens without a leading space)
    ends_word_V: np.ndarray  # bool: the text ends in a letter, digit or '_'

    @classmethod
    def from_texts(cls, texts: list[str]) -> TokenTable:
        """The table of a vocabulary given each id's decoded text."""
        base = np.array([classify_text(t) for t in texts], dtype=np.int8)
        ends = np.array([bool(t) and _word_char(t[-1]) for t in texts], dtype=bool)
        return cls(texts, base, ends)

    @classmethod
    def from_tokenizer(cls, tok, vocab_size: int) -> TokenTable:
        """Decode every id as it reads inside text: after an anchor letter, so tokenizers
        that drop a leading space when a token is decoded alone keep it."""
        anchor = tok.encode("a", add_special_tokens=False).ids[:1]
        n = min(vocab_size, tok.get_vocab_size(with_added_tokens=True))
        head = tok.decode(anchor) if anchor else ""
        pairs = tok.decode_batch([anchor + [i] for i in range(n)])
        texts = [p[len(head) :] if p.startswith(head) else p for p in pairs]
        texts += [""] * (vocab_size - n)  # ids the model has beyond the tokenizer's: "other"
        return cls.from_texts(texts)

    def classes(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S) int64 class of each occurrence (CLASSES)."""
        ids = tokens_BS.cpu().numpy()
        base = self.base_V[ids].astype(np.int64)
        prev_word = np.zeros_like(ids, dtype=bool)
        prev_word[:, 1:] = self.ends_word_V[ids[:, :-1]]
        letters = base == _LETTERS
        base[letters & prev_word] = CONT
        base[letters & ~prev_word] = START
        return torch.from_numpy(base)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in bits of a distribution (zeros allowed)."""
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def domain_dependence(counts_GE: np.ndarray) -> float:
    """I(domain; expert) / H(domain) over assignments: 0 when routing says nothing about
    the domain, 1 when the expert chosen gives the domain away; 0 with one domain."""
    n = counts_GE.sum()
    if n == 0:
        return 0.0
    p = counts_GE / n
    h_d = entropy(p.sum(1))
    if h_d == 0:
        return 0.0
    mi = h_d + entropy(p.sum(0)) - entropy(p.ravel())
    return max(0.0, mi / h_d)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits between two count or probability vectors (0..1)."""
    p = p / max(p.sum(), 1e-30)
    q = q / max(q.sum(), 1e-30)
    m = (p + q) / 2
    return max(0.0, entropy(m) - (entropy(p) + entropy(q)) / 2)


@dataclass
class LayerCounts:
    """What one MoE layer did with the text so far (all counts)."""

    n_experts: int
    tokens: int = 0
    assign_GE: np.ndarray = field(init=False)  # assignments by domain and expert
    class_CE: np.ndarray = field(init=False)  # assignments by token class and expert
    coact_EE: np.ndarray = field(init=False)  # tokens that chose both i and j (diagonal: chose i)
    conf_hist: np.ndarray = field(init=False)  # tokens by top-1 gate probability bin
    conf_sum: float = 0.0
    pairs: dict[int, int] = field(default_factory=dict)  # token id * E + expert -> assignments

    def __post_init__(self):
        E = self.n_experts
        self.assign_GE = np.zeros((0, E), np.int64)  # grows as domains appear
        self.class_CE = np.zeros((len(CLASSES), E), np.int64)
        self.coact_EE = np.zeros((E, E), np.int64)
        self.conf_hist = np.zeros(CONF_BINS, np.int64)

    def add(self, r: Routing, tokens_T: torch.Tensor, classes_T: torch.Tensor, domain: int) -> None:
        """Count one batch: its routing, the token ids and classes routed (T,), its domain."""
        E = self.n_experts
        idx_TK = r.expert_idx_TK.cpu()
        T, K = idx_TK.shape
        self.tokens += T
        if domain >= len(self.assign_GE):
            grow = np.zeros((domain + 1 - len(self.assign_GE), E), np.int64)
            self.assign_GE = np.concatenate([self.assign_GE, grow])
        self.assign_GE[domain] += torch.bincount(idx_TK.reshape(-1), minlength=E).numpy()
        cls_TK = classes_T.reshape(-1, 1).expand(T, K)
        self.class_CE += (
            torch.bincount((cls_TK * E + idx_TK).reshape(-1), minlength=len(CLASSES) * E).view(-1, E).numpy()
        )
        onehot_TE = torch.zeros(T, E).scatter_(1, idx_TK, 1.0)
        self.coact_EE += (onehot_TE.T @ onehot_TE).round().long().numpy()
        top1_T = r.probs_TE.detach().float().cpu().amax(-1)
        self.conf_sum += float(top1_T.sum())
        bins = (top1_T * CONF_BINS).long().clamp(0, CONF_BINS - 1)
        self.conf_hist += torch.bincount(bins, minlength=CONF_BINS).numpy()
        keys, n = torch.unique(tokens_T.reshape(-1, 1).expand(T, K) * E + idx_TK, return_counts=True)
        for k, c in zip(keys.tolist(), n.tolist(), strict=True):
            self.pairs[k] = self.pairs.get(k, 0) + c

    def domains(self, n: int) -> np.ndarray:
        """(n, E) assignments by domain, rows of domains this layer never saw as zeros."""
        out = np.zeros((n, self.n_experts), np.int64)
        out[: len(self.assign_GE)] = self.assign_GE
        return out

    @property
    def share_E(self) -> np.ndarray:
        """Each expert's share of the assignments."""
        a = self.assign_GE.sum(0)
        return a / max(a.sum(), 1)

    def coactivation_lift(self) -> np.ndarray:
        """(E, E): how often two experts are chosen for the same token against independence
        (observed / (p_i p_j); 1 = as if independent, 0 = never together); diagonal 0."""
        n = max(self.tokens, 1)
        p = np.diag(self.coact_EE) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(np.outer(p, p) > 0, (self.coact_EE / n) / np.outer(p, p), 0.0)
        np.fill_diagonal(lift, 0.0)
        return lift

    def top_tokens(self, token_freq_V: np.ndarray, total: int, k: int = 8, min_count: int = 5) -> list[list[tuple]]:
        """Per expert, its `k` most characteristic tokens: (id, lift, count), lift = P(token | expert) / P(token),
        ranked by count x log(lift) - over-represented *and* frequent: by lift alone every token an expert takes
        exclusively ties at the top - among tokens it took at least `min_count` times."""
        E = self.n_experts
        per: list[list[tuple]] = [[] for _ in range(E)]
        per_e = self.assign_GE.sum(0)
        for key, c in self.pairs.items():
            t, e = divmod(key, E)
            if c >= min_count and token_freq_V[t] > 0:
                per[e].append((t, (c / per_e[e]) / (token_freq_V[t] / total), c))
        return [sorted((r for r in p if r[1] > 1), key=lambda r: -r[2] * math.log(r[1]))[:k] for p in per]


@dataclass
class LayerDiff:
    """How two models' decisions at one MoE layer differ on the same tokens."""

    n_experts: int
    tokens: int = 0
    top1_changed: int = 0
    topk_changed: int = 0
    kept: float = 0.0  # sum over tokens of the share of A's k experts that B also chose
    usage_a: np.ndarray = field(init=False)
    usage_b: np.ndarray = field(init=False)

    def __post_init__(self):
        self.usage_a = np.zeros(self.n_experts, np.int64)
        self.usage_b = np.zeros(self.n_experts, np.int64)

    def add(self, idx_a_TK: torch.Tensor, idx_b_TK: torch.Tensor) -> None:
        """Count one batch of decisions (T, K) of model A and model B for the same tokens."""
        a, b = idx_a_TK.cpu(), idx_b_TK.cpu()
        self.tokens += a.shape[0]
        self.top1_changed += int((a[:, 0] != b[:, 0]).sum())
        self.topk_changed += int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())
        both_TE = torch.zeros(a.shape[0], self.n_experts).scatter_(1, a, 1.0) * torch.zeros(
            b.shape[0], self.n_experts
        ).scatter_(1, b, 1.0)
        self.kept += float(both_TE.sum()) / a.shape[1]
        self.usage_a += torch.bincount(a.reshape(-1), minlength=self.n_experts).numpy()
        self.usage_b += torch.bincount(b.reshape(-1), minlength=self.n_experts).numpy()

    def summary(self) -> dict:
        """Fractions of tokens whose top-1 / top-k set changed, the mean share of a token's k experts kept, and the JS
        divergence (bits) of expert usage."""
        n = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "top1_changed": self.top1_changed / n,
            "topk_changed": self.topk_changed / n,
            "topk_kept": self.kept / n,  # with large k a changed set is the rule: how much of it stayed
            "usage_js_bits": js_divergence(self.usage_a.astype(float), self.usage_b.astype(float)),
            "share_a": (self.usage_a / max(self.usage_a.sum(), 1)).tolist(),
            "share_b": (self.usage_b / max(self.usage_b.sum(), 1)).tolist(),
        }


def expert_similarity(tensors: dict[str, torch.Tensor], layer_names: list[str]) -> list[float | None]:
    """Per MoE layer (weights under `NAME.experts.`): the mean pairwise cosine similarity of
    its experts' weights (w_gate, w_up, w_down flattened together): 1 = identical copies,
    as just after upcycling; near 0 for independent initialisations. None where the
    weights are not plain tensors (a quantized checkpoint) or there is one expert."""
    out: list[float | None] = []
    for name in layer_names:
        parts = [tensors.get(f"{name}.experts.{w}") for w in ("w_gate", "w_up", "w_down")]
        if any(p is None or not p.is_floating_point() for p in parts):
            out.append(None)
            continue
        E = parts[0].shape[0]  # type: ignore[union-attr]
        if E < 2:
            out.append(None)
            continue
        w_EP = torch.cat([p.reshape(E, -1).double() for p in parts], dim=1)  # type: ignore[union-attr]
        w_EP = w_EP / w_EP.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos_EE = w_EP @ w_EP.T
        out.append(float((cos_EE.sum() - cos_EE.diagonal().sum()) / (E * (E - 1))))
    return out


def percent(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * x:.1f}%" if math.isfinite(x) else "n/a"
