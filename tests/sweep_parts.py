"""Registered parts for sweep tests: grids name oracles by registry name, and every worker imports this."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sims_lens.oracles import register_oracle
from tests.helpers import LetterOracle


@register_oracle("letter_e")
@dataclass
class SweepLetterOracle(LetterOracle):
    """:class:`~tests.helpers.LetterOracle` under a registry name, optionally slow or failing.

    ``delay``: seconds per call (so a test can kill a sweep mid-cell); ``fail_if``: a file whose
    existence makes every call raise (a failure that running again can get past); ``die``: the
    process exits at once, as under the kernel's out-of-memory killer.
    """

    delay: float = 0.0
    fail_if: str = ""
    die: bool = False

    def score(self, prompts, responses):
        if self.die:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_if and Path(self.fail_if).exists():
            raise RuntimeError(f"simulated crash ({self.fail_if} exists)")
        time.sleep(self.delay)
        return super().score(prompts, responses)
