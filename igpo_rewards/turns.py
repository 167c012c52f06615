"""Turn bookkeeping: ragged per-turn lists as [B, T] arrays, turns per row of a response mask, and
the final turn of each rollout.

Every adapter needs these between its engine's layout and the equations: TRL's and verl's
rollouts hand over the probe log-probs of each rollout as a list of n_i values (ragged), verl's
``response_mask`` [B, S] holds one run of 1s per turn, and the final turn is where the outcome
reward goes. Shapes: B rollouts, T turns (padded), S response tokens; n_i is rollout i's number
of turns, and ``turn_mask`` [B, T] is the prefix mask with row sums n_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from igpo_rewards import _checks, _turns
from igpo_rewards.backends import Backend, backend_name_of, get_backend

__all__ = ["PaddedTurns", "final_turn_mask", "num_turns_from_response_mask", "pad_turns"]

Array = Any


class PaddedTurns(NamedTuple):
    """:func:`pad_turns`' result: ragged per-turn values as a [B, T] array and its turn mask."""

    values: Array
    """[B, T] floating: row i holds its n_i values, then 0 on the padded turns."""
    turn_mask: Array
    """[B, T] bool prefix mask: True on turns j < n_i."""


def _rows_of(ragged_turn_values: Any) -> list[Any]:
    """The B rows of ``ragged_turn_values``: a list/tuple of rows, or an array of rows (verl's
    ``non_tensor_batch`` columns are NumPy object arrays of lists; a [B, T] array is B full rows)."""
    is_array = hasattr(ragged_turn_values, "shape") and not isinstance(ragged_turn_values, (list, tuple))
    if not is_array and not isinstance(ragged_turn_values, (list, tuple)):
        raise TypeError(
            f"ragged_turn_values must be a sequence of B rows (one sequence of per-turn values per rollout), "
            f"got {type(ragged_turn_values).__name__}"
        )
    if is_array:
        backend_name_of(ragged_turn_values, argument="ragged_turn_values")  # refuses other array types
        if len(ragged_turn_values.shape) == 0:
            raise ValueError("ragged_turn_values must hold B rows, got a 0-d array")
    return list(ragged_turn_values)


def _row_lengths(rows: list[Any]) -> list[int]:
    """n_i of every row; a row must be a 1-D sequence or array of numbers."""
    lengths = []
    for index, row in enumerate(rows):
        shape = getattr(row, "shape", None)
        if shape is not None:
            if len(shape) != 1:
                raise ValueError(
                    f"ragged_turn_values[{index}] must be 1-D [n_i] (one value per turn), got shape {tuple(shape)}"
                )
            lengths.append(int(shape[0]))
        elif isinstance(row, (list, tuple)):
            lengths.append(len(row))
        else:
            raise TypeError(
                f"ragged_turn_values[{index}] must be a sequence or 1-D array of per-turn values, got "
                f"{type(row).__name__} {row!r:.80}"
            )
    return lengths


def _check_lengths(lengths: list[int], max_turns: int | None) -> int:
    """T: ``max_turns``, or the longest row; a row longer than ``max_turns`` is an error."""
    if max_turns is None:
        return max(lengths, default=0)
    longer = [row for row, length in enumerate(lengths) if length > max_turns]
    if longer:
        shown = longer[:5]
        raise ValueError(
            f"max_turns = {max_turns} (the most turns a rollout may have), but ragged_turn_values rows {shown} have "
            f"{[lengths[row] for row in shown]} turns"
        )
    return max_turns


def _pad_on_host(backend: Backend, rows: list[Any], lengths: list[int], num_turns: int, like: Array | None) -> Array:
    """Host rows (Python sequences, NumPy arrays) padded with NumPy, then one conversion to the backend.

    The dtype: the promoted dtype of the NumPy rows, or (Python numbers only) what the backend
    makes of Python floats (float64 NumPy, torch.get_default_dtype(), JAX's default float).
    """
    converted = [np.asarray(row) for row in rows]
    for index, row in enumerate(converted):
        if row.dtype.kind not in "biuf":
            raise TypeError(f"ragged_turn_values[{index}] must hold real numbers, got dtype {row.dtype}")
    floats = [row.dtype for row in rows if isinstance(row, np.ndarray) and row.dtype.kind == "f"]
    padded = np.zeros((len(rows), num_turns), dtype=np.result_type(*floats) if floats else np.float64)
    if converted:
        padded[np.arange(num_turns)[None, :] < np.asarray(lengths, dtype=np.int64)[:, None]] = np.concatenate(converted)
    values = backend.asarray(padded, like=like)
    if not floats:  # Python numbers and ints: the library's default float
        values = backend.astype(values, backend.asarray([0.0]).dtype)
    return values


def _pad_on_device(backend: Backend, rows: list[Any], lengths: list[int], num_turns: int, like: Array) -> Array:
    """Rows that are arrays of the backend's library, padded with its own ops (no host copy, no sync)."""
    converted = [backend.asarray(row, like=like) for row in rows]
    for index, row in enumerate(converted):
        _checks.check_numeric(backend, f"ragged_turn_values[{index}]", row)
    dtype = backend.float_dtype(*converted)
    padded = [
        backend.concat([backend.astype(row, dtype), backend.zeros((num_turns - length,), dtype, like=like)], axis=0)
        for row, length in zip(converted, lengths)
    ]
    return backend.stack(padded, axis=0)


def pad_turns(ragged_turn_values: Sequence[Any], *, max_turns: int | None = None, like: Array | None = None) -> PaddedTurns:
    r"""Pads ragged per-turn lists (rollout i holds n_i values) to a [B, T] array and its turn mask.

    .. math:: \text{values}_{i,j} = v_{i,j} \ (j < n_i), \quad 0 \ (n_i \le j < T); \qquad
              \text{turn\_mask}_{i,j} = [j < n_i]

    What TRL's and verl's rollouts hand over (a list of each rollout's n_i probe log-probs) as
    the [B, T] inputs of :func:`igpo_advantages` or :func:`turn_rewards`.

    Args:
      ragged_turn_values: B rows, row i the n_i values of rollout i's turns: Python sequences,
        NumPy arrays (a NumPy object array of rows, verl's ``non_tensor_batch`` column, too),
        or 1-D arrays of one library (torch Tensors, JAX arrays); a [B, T] array is B full rows.
        A row may be empty (n_i = 0: a row of zeros in the mask, i.e. batch padding).
      max_turns: T, the most turns a rollout may have and the number of turn slots; a longer
        row is an error. None: T = the longest row (0 for an empty batch).
      like: an array whose library and device the result takes (e.g. a tensor on the GPU);
        None: the rows' library (NumPy for Python sequences and NumPy rows).

    Returns:
      :class:`PaddedTurns` (values [B, T] floating, turn_mask [B, T] bool) of one library. The
      dtype is the rows' promoted floating dtype; Python numbers get the library's default
      float (float64 on NumPy, ``torch.get_default_dtype()``, JAX's default float); ints promote.

    Raises:
      TypeError: not a sequence of rows, a row that is not a sequence or array of numbers, or
        arrays of two libraries.
      ValueError: a row that is not 1-D, a row longer than ``max_turns``, ``max_turns`` < 0.

    Example:
      >>> values, turn_mask = pad_turns([[-2.3, -0.1, -0.4], [-1.2], []])
      >>> values
      array([[-2.3, -0.1, -0.4],
             [-1.2,  0. ,  0. ],
             [ 0. ,  0. ,  0. ]])
      >>> turn_mask.astype(int)
      array([[1, 1, 1],
             [1, 0, 0],
             [0, 0, 0]])
      >>> pad_turns([[-2.3, -0.1, -0.4]], max_turns=2)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: max_turns = 2 (the most turns a rollout may have), but ragged_turn_values rows [0] have [3] turns
    """
    if max_turns is not None:
        max_turns = _checks.check_count("max_turns", max_turns)
    rows = _rows_of(ragged_turn_values)
    lengths = _row_lengths(rows)
    num_turns = _check_lengths(lengths, max_turns)
    libraries: dict[str, Any] = {}  # the first row of each device library, named as in a mixing error
    seen: set[str] = set()
    for index, row in enumerate(rows):
        name = backend_name_of(row, argument=f"ragged_turn_values[{index}]")
        if name in ("torch", "jax") and name not in seen:
            seen.add(name)
            libraries[f"ragged_turn_values[{index}]"] = row
    backend = get_backend(like=like, **libraries)
    if libraries:
        like = like if like is not None else next(iter(libraries.values()))
        values = _pad_on_device(backend, rows, lengths, num_turns, like)
    else:
        values = _pad_on_host(backend, rows, lengths, num_turns, like)
    counts = backend.asarray(np.asarray(lengths, dtype=np.int64).reshape(-1), like=values)
    turn_mask = backend.arange(num_turns, like=values)[None, :] < counts[:, None]
    return PaddedTurns(values, turn_mask)


def num_turns_from_response_mask(response_mask: Array, *, validate: bool = True) -> Array:
    r"""The number of turns of each row of a verl-style response mask: its runs of 1s.

    .. math:: n_b = \#\{s : m_{b,s} = 1,\ s = 0 \text{ or } m_{b,s-1} = 0\}

    Args:
      response_mask: [B, S] 1 (or True) on generated tokens, 0 on observation, tool and
        padding tokens; each maximal run of 1s is one turn.
      validate: check that the mask holds only 0/1 (a host sync on accelerators).

    Returns:
      [B] integer array (int64 on NumPy/Torch, JAX's default int) of the mask's library: n_b,
      0 for a row of zeros. Computed on the mask's device, no host sync.

    Example:
      >>> num_turns_from_response_mask([[1, 1, 0, 0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0], [0] * 9])
      array([3, 1, 0])
    """
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(response_mask=response_mask)
    mask = _turns.response_mask(backend, response_mask, validate=validate)
    if mask.shape[1] == 0:
        return backend.zeros((mask.shape[0],), backend.index_dtype(), like=mask)
    starts, _ = _turns.run_starts_and_ends(backend, mask)
    return backend.sum(backend.astype(starts, backend.index_dtype()), axis=1)


def final_turn_mask(turn_mask: Array, *, validate: bool = True) -> Array:
    r"""True at each rollout's final (answer) turn j = n_i - 1, where the outcome reward goes.

    .. math:: \text{final}_{i,j} = [j = n_i - 1], \qquad n_i = \sum_j \text{turn\_mask}_{i,j}

    The other valid turns (``turn_mask & ~final_turn_mask(turn_mask)``) are the ones with an
    information gain.

    Args:
      turn_mask: [B, T] prefix mask of valid turns (bool or 0/1).
      validate: check that the mask holds only 0/1 and is a prefix mask per row.

    Returns:
      [B, T] bool array of the mask's library; a row of zeros (batch padding) is all False, a
      one-turn row is True at j = 0.

    Example:
      >>> final_turn_mask([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).astype(int)
      array([[0, 0, 1],
             [1, 0, 0],
             [0, 0, 0]])
    """
    validate = _checks.check_flag("validate", validate)
    backend = get_backend(turn_mask=turn_mask)
    turn_mask = backend.asarray(turn_mask)
    _checks.check_ndim("turn_mask", turn_mask, 2, "B, T")
    turn_mask = _checks.as_mask(backend, "turn_mask", turn_mask, validate=validate)
    if validate:
        _checks.check_prefix_mask(backend, "turn_mask", turn_mask)
    return _turns.final_turn_mask(backend, turn_mask)
