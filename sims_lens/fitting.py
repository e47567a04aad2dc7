"""Step 6 as a function, and the same fit from one's own pairs (``fit_pairs``).

:func:`fit_steering` turns a batch's :class:`~sims_lens.activations.PairActivations` into a
:class:`~sims_lens.steering.functions.SteeringSet`: one function per steered hook from the learner,
scaled by the multiplier. The SIMS loop, ``sims-lens eval``'s static fits and :func:`fit_pairs`
all call it, after the same capture (:func:`sims_lens.capture.capture_activations`), so a vector
fitted from given pairs and one fitted by a SIMS iteration differ only in where the pairs came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sims_lens.activations import PairActivations
from sims_lens.batching import AUTO, BatchSize
from sims_lens.capture import REDUCTIONS, capture_activations, pair_tokens
from sims_lens.chat import Exchange, encode_chat, end_token_ids, response_ids_for_text
from sims_lens.config import HOOK_SUFFIXES, parse_layers, resolve_layers
from sims_lens.contrast import Pair
from sims_lens.pairs import PairSource, load_pairs
from sims_lens.steering.functions import SteeringSet
from sims_lens.steering.hooks import check_hooks
from sims_lens.steering.learners import Learner, make_learner
from sims_lens.steering.positions import validate_policy
from sims_lens.validation import require


def learner_positions(learner: Learner, positions: str = "auto") -> str:
    """The position policy of a fit: ``positions``, or for ``"auto"`` the learner's own default."""
    return str(getattr(learner, "positions", "all")) if positions == "auto" else positions


def fit_steering(
    learner: Learner,
    activations: PairActivations,
    *,
    reduction: str = "mean",
    multiplier: float = 1.0,
    positions: str = "auto",
    model_name: str = "",
) -> SteeringSet:
    """One steering function per steered hook of ``activations``, from ``learner``, times ``multiplier``.

    A learner of token pairs (HPR) gets position-paired tokens; every other one gets each sample's
    tokens reduced by ``reduction`` (``mean`` or ``last``).
    """
    if learner.inputs == "token_pairs":
        pos, neg = pair_tokens(activations.positives, activations.negatives)
    else:
        pos, neg = activations.reduced(reduction)
    functions = []
    for i, hook in enumerate(activations.hooks):
        fn = learner.fit(pos[:, i], neg[:, i], hook)
        fn.iteration = activations.iteration
        fn.multiplier *= multiplier
        functions.append(fn)
    return SteeringSet.from_functions(
        functions,
        positions=learner_positions(learner, positions),
        model_name=model_name,
        iteration=activations.iteration,
    )


def capture_pairs(
    model: Any,
    tokenizer: Any,
    positives: Sequence[Exchange],
    negatives: Sequence[Exchange],
    prompt_ids: Sequence[str],
    hooks: Sequence[str],
    *,
    iteration: int = 0,
    observed: Sequence[str] = (),
    batch_size: BatchSize = AUTO,
    on_batch: Any = None,
) -> PairActivations:
    """Step 5: the *base* model's activations of paired responses (never steered), in one forward pass per batch.

    Response tokens at ``hooks`` (for the learner) and, per sample, their mean at the ``observed``
    hooks (for analysis; a hook in both is captured once). The end-of-turn token is never part of
    a response's span.
    """
    pad, ends = int(tokenizer.pad_token_id), end_token_ids(tokenizer)
    pos, neg = (
        capture_activations(model, side, hooks, pad, batch_size, on_batch, end_ids=ends, mean_hooks=observed)
        for side in (positives, negatives)
    )
    return PairActivations(
        iteration, list(prompt_ids), list(hooks), pos.tokens, neg.tokens, list(observed), pos.means, neg.means
    )


def capture_selected(
    model: Any, tokenizer: Any, pairs: Sequence[Pair], hooks: Sequence[str], **options: Any
) -> PairActivations:
    """:func:`capture_pairs` of selected D+/D- pairs (each pair's prompt is its id); ``options`` as there."""
    return capture_pairs(
        model,
        tokenizer,
        [p.positive.exchange for p in pairs],
        [p.negative.exchange for p in pairs],
        [p.positive.prompt_id for p in pairs],
        hooks,
        **options,
    )


def fit_pairs(
    model: Any,
    tokenizer: Any,
    pairs: PairSource,
    learner: str | Learner = "mean_diff",
    layers: int | Sequence[int] | str | None = None,
    hook: str = "hook_resid_post",
    reduction: str = "mean",
    *,
    multiplier: float = 1.0,
    positions: str = "auto",
    batch_size: BatchSize = AUTO,
) -> SteeringSet:
    """A steering set from your own ``(prompt, chosen, rejected)`` pairs, with the loop's capture and learners.

    ``pairs``: triples, dicts with those fields, or a ``.jsonl``/``.csv`` file or ``hf:NAME`` with
    them (:func:`sims_lens.pairs.load_pairs`). ``layers``: a layer, a list, ``"all"``, or None for the
    middle layer. ``reduction``: each response's ``mean`` over its tokens or its ``last`` token.
    Prompts are chat-formatted as in a SIMS run; the responses' end-of-turn tokens are not read.
    """
    contrast = load_pairs(pairs)
    n_layers = int(model.cfg.n_layers)
    require(reduction in REDUCTIONS, "reduction", reduction, f"one of {list(REDUCTIONS)}")
    require(hook in HOOK_SUFFIXES, "hook", hook, f"one of {list(HOOK_SUFFIXES)}")
    require(multiplier != 0, "multiplier", multiplier, "a non-zero number")
    if positions != "auto":
        validate_policy(positions)
    chosen_layers = (
        resolve_layers(parse_layers([layers] if isinstance(layers, int) else layers), n_layers)
        if (layers is not None)
        else [n_layers // 2]
    )
    require(chosen_layers is not None, "layers", layers, "a layer, a list of layers or 'all' (top:K needs a SIMS run)")
    assert chosen_layers is not None
    hooks = [f"blocks.{layer}.{hook}" for layer in chosen_layers]
    check_hooks(model, hooks)
    fitter = make_learner(learner) if isinstance(learner, str) else learner

    def exchanges(side: str) -> list[Exchange]:
        return [
            Exchange(tuple(encode_chat(tokenizer, p.prompt)), tuple(response_ids_for_text(tokenizer, getattr(p, side))))
            for p in contrast
        ]

    chosen, rejected = exchanges("chosen"), exchanges("rejected")
    first: dict[str, int] = {}  # pairs of one prompt share its id (separability folds never split a prompt)
    ids = [f"q{first.setdefault(p.prompt, len(first)):04d}" for p in contrast]
    activations = capture_pairs(model, tokenizer, chosen, rejected, ids, hooks, batch_size=batch_size)
    return fit_steering(
        fitter,
        activations,
        reduction=reduction,
        multiplier=multiplier,
        positions=positions,
        model_name=str(getattr(model.cfg, "model_name", "")),
    )
