"""Prompt ranking (SIMS-PR): the model judges its own responses, pair by pair.

For each prompt and each ordered pair (i, j) of its K candidate responses, the model reads a
judging prompt (in its own chat format) that shows the user's request, response i as "A",
response j as "B" and a criterion, and is asked for the letter of the better response. The
preference is read from the next-token logits of the two answer tokens only (a softmax over just
those two; no text is generated or parsed):

    P_A(i, j) = softmax(logit["A"], logit["B"])[0]        with i shown as A and j as B.

Every pair is judged in both orders and averaged, which cancels the judge's position bias:

    pref(i, j) = 0.5 * (P_A(i, j) + P_B(j, i)) = 0.5 * (P_A(i, j) + 1 - P_A(j, i)),

so pref(i, j) + pref(j, i) = 1 exactly. Pairwise preferences become per-response scores by Copeland
(wins minus losses at the 0.5 threshold) or Bradley-Terry (log-strengths fitted by MM iterations
on the soft win matrix).

Which policy judges is decided by the caller: the forwards run under whatever steering hooks are
active around :meth:`SelfJudge.score` (none: the base model M; ``with apply_steering(...)``: pi_t).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sims_lens.chat import chat_text, encode_text, left_pad
from sims_lens.generation import precise_dtype
from sims_lens.oracles.base import check_inputs, register_oracle
from sims_lens.steering.positions import track_positions
from sims_lens.validation import check_choice, check_int, check_text, rename_key

DEFAULT_CRITERION = "Which response is warmer, more positive and more helpful?"

DEFAULT_TEMPLATE = (
    "Compare two responses to a user's request.\n\n"
    "Request: {prompt}\n\n"
    "Response A: {response_a}\n\n"
    "Response B: {response_b}\n\n"
    "{criterion} Answer with a single letter: A or B."
)
"""The judging request (the user turn of the judge's chat). Fields: ``prompt``, ``response_a``,
``response_b``, ``criterion``."""

TEMPLATE_FIELDS = ("prompt", "response_a", "response_b", "criterion")
RANKINGS = ("copeland", "bradley_terry")
"""How pairwise preferences become per-response scores (the ``ranking`` setting)."""
LETTERS = ("A", "B")
_TIE = 1e-6  # Copeland: |pref - 0.5| below this is a tie (float noise from batching never decides a win)


def answer_token_ids(tokenizer: Any, answer_prefix: str = "") -> tuple[int, int]:
    """The token ids of the answers "A" and "B" right after the judge's answer prefix.

    After an empty prefix (the assistant turn has just begun on a new line) or one ending in a
    newline, the answers are the bare letters; after other text, the letters with a leading space
    (" A", " B"), the way a BPE tokenizer writes a word after a word. Raises ``ValueError`` unless
    both are single tokens and differ.
    """
    spaced = bool(answer_prefix) and not answer_prefix.endswith("\n")
    ids: list[int] = []
    for letter in LETTERS:
        text = (" " if spaced else "") + letter
        tokens = encode_text(tokenizer, text)
        if len(tokens) != 1:
            raise ValueError(
                f"self_judge: the answer {text!r} is {len(tokens)} tokens {tokens} for this tokenizer; the "
                "judge reads one next-token probability per answer, so it needs single-token answers"
            )
        ids.append(int(tokens[0]))
    if ids[0] == ids[1]:
        raise ValueError(f"self_judge: the answers A and B map to the same token id {ids[0]}")
    return ids[0], ids[1]


def copeland_scores(pref: Float[Tensor, "k k"]) -> Float[Tensor, " k"]:
    """Copeland score of each response: wins minus losses over its pairwise preferences.

    ``pref[i, j]`` is the probability that i beats j; i wins the pair when it is above 0.5, loses
    when below; a tie (0.5) counts half a win and half a loss, so it adds nothing.
    """
    _check_square(pref)
    off = ~torch.eye(pref.shape[0], dtype=torch.bool, device=pref.device)
    wins = ((pref > 0.5 + _TIE) & off).sum(-1)
    losses = ((pref < 0.5 - _TIE) & off).sum(-1)
    return (wins - losses).to(precise_dtype(pref.device))


def bradley_terry_scores(pref: Float[Tensor, "k k"], iterations: int = 1000, tol: float = 1e-10) -> Float[Tensor, " k"]:
    """Bradley-Terry log-strengths fitted to a soft win matrix (Hunter's MM algorithm).

    ``pref[i, j]`` is read as the (fractional) number of times i beat j in one comparison of the
    pair, so ``pref[i, j] + pref[j, i] = 1``. Each MM step sets
    ``p_i = W_i / sum_{j != i} n_ij / (p_i + p_j)`` with ``W_i = sum_j pref[i, j]``; strengths are
    renormalised to a geometric mean of 1, so the returned log-strengths sum to 0.
    """
    _check_square(pref)
    k = pref.shape[0]
    if k < 2:
        return torch.zeros(k, dtype=torch.float64)
    off = ~torch.eye(k, dtype=torch.bool)
    w = pref.detach().to("cpu", torch.float64).clamp(1e-9, 1 - 1e-9) * off
    n = w + w.T
    wins = w.sum(-1)
    p = torch.ones(k, dtype=torch.float64)
    for _ in range(iterations):
        denom = (n / (p[:, None] + p[None, :])).sum(-1)
        new = wins / denom
        new = new / new.log().mean().exp()
        done = float((new.log() - p.log()).abs().max()) < tol
        p = new
        if done:
            break
    logp = p.log()
    return logp - logp.mean()


def rank_preferences(pref: Float[Tensor, "k k"], method: str = "copeland") -> Float[Tensor, " k"]:
    """Per-response scores from a pairwise preference matrix (``"copeland"`` or ``"bradley_terry"``)."""
    check_choice("self_judge", "ranking", method, RANKINGS)
    return copeland_scores(pref) if method == "copeland" else bradley_terry_scores(pref)


def _check_square(pref: Tensor) -> None:
    if pref.ndim != 2 or pref.shape[0] != pref.shape[1]:
        raise ValueError(f"a pairwise preference matrix must be square [K, K], got shape {tuple(pref.shape)}")


@register_oracle("self_judge")
@dataclass
class SelfJudge:
    """The policy as its own judge (SIMS-PR), from answer-token probabilities on pairwise prompts.

    Settings: ``criterion`` (the question the judge answers), ``template`` (the judging request;
    fields ``{prompt}``, ``{response_a}``, ``{response_b}``, ``{criterion}``), ``system`` (the
    judge's system message; None keeps the chat template's default), ``answer_prefix`` (text that
    opens the judge's answer before the letter, e.g. ``"The better response is"``; empty: the letter
    is the answer's first token), ``ranking`` (``"copeland"`` or ``"bradley_terry"``) and
    ``batch_size`` (judging prompts per forward).
    """

    name: ClassVar[str] = "self_judge"
    relative: ClassVar[bool] = True
    """Scores rank responses within one call (they sum to zero): compare only within a group."""
    judges_with_policy: ClassVar[bool] = True
    """It judges as the model it runs on: the current policy during training (SIMS-PR)."""
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)
    criterion: str = DEFAULT_CRITERION
    template: str = DEFAULT_TEMPLATE
    system: str | None = None
    answer_prefix: str = ""
    ranking: str = "copeland"
    batch_size: int = 8
    answer_ids: tuple[int, int] = field(default=(-1, -1), init=False)
    _keep_last_only: bool = field(default=True, init=False, repr=False)

    @staticmethod
    def prepare_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
        """Accept the old name ``aggregation`` of ``ranking`` (with a one-line note)."""
        out = dict(settings)
        rename_key(out, "aggregation", "ranking", "oracles.self_judge")
        return out

    def __post_init__(self) -> None:
        if self.model is None or self.tokenizer is None:
            raise ValueError(
                "self_judge needs the language model and its tokenizer: "
                "make_oracle('self_judge', settings, model=bridge, tokenizer=tokenizer)"
            )
        check_text(self.name, criterion=self.criterion, template=self.template)
        fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        if fields != set(TEMPLATE_FIELDS):
            raise ValueError(
                f"self_judge: setting 'template' must use exactly the fields {{prompt}}, {{response_a}}, "
                f"{{response_b}} and {{criterion}}; it uses {sorted(fields)}"
            )
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"self_judge: setting 'system' must be text or None, got {self.system!r}")
        if not isinstance(self.answer_prefix, str) or self.answer_prefix.endswith((" ", "\t")):
            raise ValueError(
                f"self_judge: setting 'answer_prefix' must be text without trailing spaces (the space before "
                f"the letter belongs to the answer token), got {self.answer_prefix!r}"
            )
        check_choice(self.name, "ranking", self.ranking, RANKINGS)
        check_int(self.name, 1, batch_size=self.batch_size)
        self.answer_ids = answer_token_ids(self.tokenizer, self.answer_prefix)
        probe = self.judge_text("Hi", "Hello.", "Hey.")
        base = encode_text(self.tokenizer, probe)
        for letter, token in zip(LETTERS, self.answer_ids, strict=True):
            spaced = (" " if self.answer_prefix and not self.answer_prefix.endswith("\n") else "") + letter
            if encode_text(self.tokenizer, probe + spaced) != [*base, token]:
                raise ValueError(
                    f"self_judge: after the judging prompt the answer {spaced!r} does not tokenize as one separate "
                    f"token; change 'answer_prefix' (now {self.answer_prefix!r})"
                )

    def judge_text(self, prompt: str, response_a: str, response_b: str) -> str:
        """The full chat-formatted judging prompt, up to where the answer letter comes."""
        request = self.template.format(
            prompt=prompt.strip(),
            response_a=response_a.strip(),
            response_b=response_b.strip(),
            criterion=self.criterion,
        )
        return chat_text(self.tokenizer, request, self.system) + self.answer_prefix

    @torch.no_grad()
    def prob_first(self, pairs: Sequence[tuple[str, str, str]]) -> Float[Tensor, " n"]:
        """P(answer "A") for each ``(prompt, response_a, response_b)``: softmax over the two answer logits."""
        if not pairs:
            return torch.zeros(0, dtype=torch.float64)
        sequences = [encode_text(self.tokenizer, self.judge_text(*pair)) for pair in pairs]
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
        pad_id = self.tokenizer.pad_token_id
        pad_id = int(pad_id if pad_id is not None else self.tokenizer.eos_token_id)
        device = next(self.model.parameters()).device
        a_id, b_id = self.answer_ids
        out = torch.empty(len(sequences), dtype=torch.float64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = left_pad([sequences[i] for i in rows], pad_id)
            logits = self._last_logits(ids.to(device), mask.to(device), mask)
            pair = logits[:, [a_id, b_id]].to("cpu", torch.float64)  # two logits: float64 on the CPU, any device
            out[rows] = torch.softmax(pair, dim=-1)[:, 0]
        return out

    def _last_logits(self, ids: Tensor, mask: Tensor, cpu_mask: Tensor) -> Tensor:
        with track_positions(self.model, cpu_mask):  # steering hooks must skip the left padding
            if self._keep_last_only:
                try:
                    return self.model(ids, attention_mask=mask, logits_to_keep=1)[:, -1, :]
                except TypeError as err:  # a bridged model without logits_to_keep: compute all positions
                    if "logits_to_keep" not in str(err):
                        raise
                    self._keep_last_only = False
            return self.model(ids, attention_mask=mask)[:, -1, :]

    def preferences(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[Float[Tensor, "k k"]]:
        """Pairwise preference matrices, one per prompt, from one batched pass over all judging prompts."""
        check_inputs(prompts, responses, self.name)
        jobs: list[tuple[int, int, int]] = []
        pairs: list[tuple[str, str, str]] = []
        for g, (prompt, group) in enumerate(zip(prompts, responses, strict=True)):
            for i in range(len(group)):
                for j in range(len(group)):
                    if i != j:
                        jobs.append((g, i, j))
                        pairs.append((prompt, group[i], group[j]))
        probs = self.prob_first(pairs)
        first = [torch.full((len(group), len(group)), 0.5, dtype=torch.float64) for group in responses]
        for (g, i, j), p in zip(jobs, probs.tolist(), strict=True):
            first[g][i, j] = p
        out = []
        for p_a in first:
            pref = 0.5 * (p_a + (1.0 - p_a.T))  # i shown as A, and i shown as B (j as A)
            pref.fill_diagonal_(0.5)
            out.append(pref)
        return out

    def pairwise_preferences(self, prompt: str, responses: Sequence[str]) -> Float[Tensor, "k k"]:
        """``pref[i, j]``: probability that response i beats response j, judged in both orders."""
        return self.preferences([prompt], [responses])[0]

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        return [rank_preferences(pref, self.ranking).tolist() for pref in self.preferences(prompts, responses)]
