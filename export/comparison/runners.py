"""Running a polygraphy runner over feeds (activation, dtype coercion), torch-free."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Feed = dict[str, np.ndarray]


def run_runner(runner, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """One polygraphy runner over the feeds, through Comparator.run (activation, dtype coercion)."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run([runner], data_loader=list(feeds))
    return [{name: np.asarray(array) for name, array in iteration.items()} for iteration in results[runner.name]]
