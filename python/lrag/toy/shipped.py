"""The trained toy generator shipped with the package, in ``lrag/toy/weights/``.

Two files, package data of :mod:`lrag.toy` (an editable and a regular install both see them):

- ``toy_generator.safetensors``: the EMA weights exported by ``lrag train-toy`` (:func:`lrag.toy.train.
  export_weights`), read by :func:`lrag.toy.train.load_toy_generator`;
- ``toy_generator.json``: the trainer's card beside it (config, step, command, validation loss, and the
  ``sha256`` of the weights file).

Every access checks the weights against the card's sha256 first, so a missing, truncated or replaced file is
refused with a message saying which file and what to do (:class:`ShippedWeightsError`), never a traceback from a
loader. ``lrag generate --demo`` runs these weights.
"""
from __future__ import annotations

import os
import re

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


class ShippedWeightsError(RuntimeError):
    """The shipped toy generator is missing, or does not match its card (the message names the file)."""


def shipped_paths() -> tuple[str, str]:
    """``(weights, card)``: where the shipped toy generator and its card lie (not checked: see
    :func:`shipped_card`)."""
    from lrag.toy.train import CARD_NAME, WEIGHTS_NAME  # noqa: PLC0415  (torch: only when asked)

    return os.path.join(WEIGHTS_DIR, WEIGHTS_NAME), os.path.join(WEIGHTS_DIR, CARD_NAME)


def _remedy(weights: str) -> str:
    return (f"the trained toy generator is package data of lrag.toy: train one with `lrag train-toy --out RUN` "
            f"(docs/toy_training.md) and copy RUN/toy_generator.safetensors and RUN/toy_generator.json into "
            f"{os.path.dirname(weights)}")


def shipped_card() -> dict:
    """The card of the shipped weights, after checking the weights file against its ``sha256``.

    Raises:
        ShippedWeightsError: the weights or the card are missing or unreadable, or the weights' sha256 is not the
            card's.
    """
    from lrag_ext.memory_format import sha256_file  # noqa: PLC0415
    from lrag_ext.state_dicts import InputFileError, check_regular_file, read_json_object  # noqa: PLC0415

    weights, card_path = shipped_paths()
    for path, what in ((weights, "toy generator"), (card_path, "toy generator card")):
        try:
            check_regular_file(path, what)
        except FileNotFoundError:
            raise ShippedWeightsError(f"the shipped {what} {path} is missing: {_remedy(weights)}") from None
        except InputFileError as e:
            raise ShippedWeightsError(f"the shipped {e}: {_remedy(weights)}") from None
    try:
        card = read_json_object(card_path, "toy generator card")
    except (FileNotFoundError, InputFileError) as e:
        raise ShippedWeightsError(f"the shipped {e}") from None
    want = card.get("sha256")
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ShippedWeightsError(f"the shipped toy generator card {card_path} has no sha256 (64 hex digits), got "
                                  f"{want!r}")
    got = sha256_file(weights)
    if got != want:
        raise ShippedWeightsError(f"the shipped toy generator {weights} has sha256 {got}, but its card {card_path} "
                                  f"says {want}: the file is corrupt, truncated or was replaced without its card; "
                                  f"{_remedy(weights)}")
    return card


def shipped_generator_path() -> str:
    """The path of the shipped ``toy_generator.safetensors``, checked against its card (:func:`shipped_card`).

    Raises:
        ShippedWeightsError: as :func:`shipped_card`.
    """
    shipped_card()
    return shipped_paths()[0]


def load_shipped_generator(device="cpu"):
    """The shipped toy generator, checked against its card: ``(model, config, card)``, the
    :class:`~lrag.models.wan.CausalWanModel` in eval mode on ``device``, its :class:`~lrag.toy.train.ToyConfig`
    and the card (a dict: ``sha256``, ``step``, ``command``, ``validation``, ...).

    Raises:
        ShippedWeightsError: as :func:`shipped_card`, or a file that matches its card but is not a toy
            generator.
    """
    from lrag.toy.train import load_toy_generator  # noqa: PLC0415
    from lrag_ext.state_dicts import InputFileError  # noqa: PLC0415

    card = shipped_card()
    try:
        model, config = load_toy_generator(shipped_paths()[0], device)
    except (FileNotFoundError, InputFileError) as e:   # removed since the check, or the card's own file is wrong
        raise ShippedWeightsError(f"the shipped {e}") from None
    return model, config, card
