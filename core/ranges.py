"""Parsing of seed lists such as `3`, `0-3` and `1,5,9`."""

from __future__ import annotations

import re

from renderqa.core.errors import InvalidInputError

MAX_SEED = 2**64 - 1
# More seeds than this in one command is almost certainly a typo (0-100000000).
MAX_SEED_COUNT = 100_000
_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_seeds(text: str, option: str = "--seeds") -> list[int]:
    """Parse `N`, `A-B` (inclusive) and comma-separated mixes of both into seeds.

    Order is kept and duplicates are dropped. Raises InvalidInputError naming the
    bad piece, for an empty list, a reversed range or a seed outside [0, 2**64 - 1].
    """
    seeds: list[int] = []
    pieces = [piece.strip() for piece in text.split(",")]
    if not text.strip() or any(not piece for piece in pieces):
        raise InvalidInputError(
            f"{option} {text!r} has an empty item; use e.g. 3, 0-3 or 1,5,9"
        )
    for piece in pieces:
        match = _RANGE.match(piece)
        if match:
            start, stop = int(match[1]), int(match[2])
            if stop < start:
                raise InvalidInputError(
                    f"{option} range {piece!r} runs backwards; write {stop}-{start}"
                )
            if stop - start + 1 > MAX_SEED_COUNT:
                raise InvalidInputError(
                    f"{option} range {piece!r} has {stop - start + 1} seeds, above the "
                    f"limit of {MAX_SEED_COUNT}; split the run into smaller ranges"
                )
            seeds.extend(range(start, stop + 1))
        elif piece.isdigit():
            seeds.append(int(piece))
        else:
            raise InvalidInputError(
                f"{option} item {piece!r} is not a seed or range; use e.g. 3, 0-3 or 1,5,9"
            )
    if len(seeds) > MAX_SEED_COUNT:
        raise InvalidInputError(
            f"{option} lists {len(seeds)} seeds, above the limit of {MAX_SEED_COUNT}"
        )
    too_large = [seed for seed in seeds if seed > MAX_SEED]
    if too_large:
        raise InvalidInputError(
            f"{option} seed {too_large[0]} is above the maximum {MAX_SEED}"
        )
    return list(dict.fromkeys(seeds))
