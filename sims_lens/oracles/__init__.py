"""Preference oracles: score K candidate responses per prompt, higher = preferred.

``make_oracle(name, settings, model=..., tokenizer=...)`` builds one of :data:`ORACLES`:

- ``lexicon_sentiment``: VADER sentiment of the response (offline, fast);
- ``self_judge``: the model judges its own responses pairwise (SIMS prompt ranking);
- ``reward_model``: a Hugging Face sequence-classification reward model;
- ``embedding_similarity``: cosine similarity to a target description (sentence embeddings);
- ``composite``: a weighted sum of other oracles with an optional length penalty.

:func:`agreement` measures how often an oracle orders response pairs like a reference oracle
(the "oracle accuracy" of the SIMS analysis).
"""

from sims_lens.oracles.base import (
    ORACLES,
    Oracle,
    agreement,
    is_relative,
    judges_with_policy,
    make_oracle,
    register_oracle,
)
from sims_lens.oracles.composite import Composite
from sims_lens.oracles.embedding import DEFAULT_TARGET, EmbeddingSimilarity, packaged_encoder_path
from sims_lens.oracles.lexicon import LexiconSentiment
from sims_lens.oracles.reward_model import RewardModel
from sims_lens.oracles.self_judge import (
    DEFAULT_CRITERION,
    DEFAULT_TEMPLATE,
    SelfJudge,
    answer_token_ids,
    bradley_terry_scores,
    copeland_scores,
    rank_preferences,
)

__all__ = [
    "DEFAULT_CRITERION",
    "DEFAULT_TARGET",
    "DEFAULT_TEMPLATE",
    "ORACLES",
    "Composite",
    "EmbeddingSimilarity",
    "LexiconSentiment",
    "Oracle",
    "RewardModel",
    "SelfJudge",
    "agreement",
    "answer_token_ids",
    "bradley_terry_scores",
    "copeland_scores",
    "is_relative",
    "judges_with_policy",
    "make_oracle",
    "packaged_encoder_path",
    "rank_preferences",
    "register_oracle",
]
