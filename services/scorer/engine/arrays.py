"""Array types and input coercion shared by the engine modules."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray: TypeAlias = NDArray[np.float64]
IntArray: TypeAlias = NDArray[np.int64]
BoolArray: TypeAlias = NDArray[np.bool_]
ObjectArray: TypeAlias = NDArray[np.object_]


def as_float_array(values: ArrayLike, name: str) -> FloatArray:
    """One-dimensional float64 view of ``values``; ``None`` entries become nan.

    The engine works on columns of many accounts; a scalar becomes a column of one so that a
    single-account rescore goes through exactly the same code as the portfolio pass.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def same_length(name_to_array: dict[str, FloatArray]) -> int:
    """The common length of the columns, or a ``ValueError`` naming the ones that differ."""
    lengths = {name: len(array) for name, array in name_to_array.items()}
    distinct = set(lengths.values())
    if len(distinct) > 1:
        raise ValueError(f"columns differ in length: {lengths}")
    return distinct.pop() if distinct else 0
