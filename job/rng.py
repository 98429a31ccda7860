"""RNG state, in one home: the generators' states as JSON values (a Python generator's, for the data
streams' shuffles and mixing; each rank's global ones, Python, NumPy, torch and CUDA, for a checkpoint),
set back, and checked as input when a checkpoint's rank file or data cursor is read back."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, StrictFloat, StrictInt

from job.saved import Saved


def random_state(rng) -> list:
    """A Python random generator's state (a random.Random, or the random module) as JSON values."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def rng_states() -> dict[str, Any]:
    """The global generators' states (Python, NumPy, torch, CUDA) as JSON values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random_state(random),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Apply states rng_states() saved, once SavedRngStates has checked them."""
    set_random_state(random, state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------
# States read back (a checkpoint's rank file, a data cursor) are input: checked before they are set.

Byte = Annotated[int, Field(ge=0, le=255, strict=True)]
Word = Annotated[int, Field(ge=0, lt=2**32, strict=True)]
MT19937_WORDS = 624  # NumPy's generator state: 624 32-bit words, and the position of the next one


def _checked_random_state(state: tuple) -> tuple:
    """A Python generator's state, tried on a new generator (which refuses what it cannot use)."""
    try:
        set_random_state(random.Random(), list(state))
    except (TypeError, ValueError, OverflowError):
        raise ValueError("not the state of a random generator") from None
    return state


RandomState = Annotated[
    tuple[StrictInt, list[StrictInt], StrictFloat | None], AfterValidator(_checked_random_state)
]


def generator_state(device: str) -> Callable[[list[int]], list[int]]:
    """A check that bytes are the state of a torch generator on device: they are set on a new one, which
    checks their size and the state's own fields (torch refuses what it cannot use). CUDA states are
    checked only where there is CUDA: elsewhere set_rng_states() does not apply them."""

    def check(state: list[int]) -> list[int]:
        if device == "cuda" and not torch.cuda.is_available():
            return state
        try:
            torch.Generator(device=device).set_state(torch.tensor(state, dtype=torch.uint8))
        except RuntimeError as e:
            raise ValueError(f"not the state of torch's {device} generator ({e})") from None
        return state

    return check


# kind, keys, pos, has_gauss, cached: NumPy does not check pos, and reads its keys at pos
NumpyState = tuple[
    Literal["MT19937"],
    Annotated[list[Word], Field(min_length=MT19937_WORDS, max_length=MT19937_WORDS)],
    Annotated[int, Field(ge=0, le=MT19937_WORDS, strict=True)],
    Annotated[int, Field(ge=0, le=1, strict=True)],
    StrictFloat,
]


class SavedRngStates(Saved):
    python: RandomState
    numpy: NumpyState
    torch: Annotated[list[Byte], AfterValidator(generator_state("cpu"))]
    cuda: Annotated[list[Byte], AfterValidator(generator_state("cuda"))] | None = None
