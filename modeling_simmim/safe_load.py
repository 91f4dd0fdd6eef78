"""Load ``torch.save`` checkpoints without ever running pickled code.

Official SimMIM checkpoints are pickles holding ``{"model": state_dict, "config": yacs.CfgNode, "optimizer": ...,
"lr_scheduler": ..., "epoch": ...}``. A plain ``torch.load`` would import and call whatever globals the pickle
names, so a tampered file could run arbitrary code. We load with ``weights_only=True`` (tensors, containers and
primitive values only) and allow exactly one extra global: ``yacs.config.CfgNode``, mapped to
``collections.OrderedDict``. yacs itself is never imported, so this works whether or not it is installed.

Why ``OrderedDict`` and not a stand-in ``dict`` subclass: torch's restricted unpickler only fills ``dict``,
``OrderedDict`` and ``Counter`` with items (SETITEMS), and only ``OrderedDict`` instances have a ``__dict__``
that can absorb the ``BUILD`` state a ``CfgNode`` carries (``__immutable__``, ``__deprecated_keys__``, ...).
A ``dict`` subclass stand-in is refused at SETITEMS on torch 2.x.

Any other global (``os.system``, ``builtins.eval``, a custom class, ...) is refused with
:class:`UnsafeCheckpointError` naming it, before anything it refers to is called.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

YACS_CFGNODE = "yacs.config.CfgNode"

# (stand-in, "module.qualname") pairs accepted by torch.serialization.safe_globals (typed as it takes them).
_ALLOWED_ALIASES: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(OrderedDict, YACS_CFGNODE)]
_ALLOWED_NAMES = {entry[1] for entry in _ALLOWED_ALIASES if isinstance(entry, tuple)}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint references pickled Python globals that are not plain data; it was not unpickled."""

    def __init__(self, path: str | os.PathLike, globals_found: list[str]):
        self.globals_found = sorted(globals_found)
        names = ", ".join(self.globals_found) or "(unknown: see the chained error)"
        super().__init__(
            f"Refusing to load {os.fspath(path)}: it contains pickled Python objects that are not plain data "
            f"({names}). Unpickling them could execute arbitrary code, so nothing was loaded. Official SimMIM "
            f"checkpoints only hold tensors, numbers, strings, containers and a yacs CfgNode. If you trust this "
            f"file, re-save it with only its state dict: torch.save({{'model': state_dict}}, path)."
        )


def _unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Globals in the pickle that are neither torch's default allow-list nor ours (static scan, runs nothing)."""
    try:
        with torch.serialization.safe_globals(_ALLOWED_ALIASES):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:  # not a zip checkpoint: the scan cannot tell, the caller reports the load error instead
        return []
    return [name for name in found if name not in _ALLOWED_NAMES]


def to_plain_data(obj: Any) -> Any:
    """Recursively turn (ordered) dicts - including loaded CfgNodes - into plain ``dict``; other values unchanged."""
    if isinstance(obj, dict):
        return {key: to_plain_data(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_plain_data(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain_data(value) for value in obj)
    return obj


def safe_load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu")`` that never executes pickled code.

    Returns the unpickled object; a yacs ``CfgNode`` anywhere inside comes back as an ``OrderedDict``
    (use :func:`to_plain_data` to get plain dicts).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle references globals other than plain data and ``yacs.config.CfgNode``.
        ValueError: the file is not a readable ``torch.save`` checkpoint (truncated, corrupted, other format).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {os.fspath(path)} does not exist (or is not a file).")
    with torch.serialization.safe_globals(_ALLOWED_ALIASES):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # Chained with `from None`: torch's text advises `weights_only=False`, i.e. running the pickle's code.
            offending = _unsafe_globals(path)
            if offending or "GLOBAL" in str(err) or "reduce" in str(err):
                raise UnsafeCheckpointError(path, offending) from None
            raise ValueError(
                f"Could not read {os.fspath(path)} as a PyTorch checkpoint (not a torch.save file: an HTML page or a "
                f"truncated download?): {_unpickler_reason(err)}"
            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as err:
            raise ValueError(
                f"Could not read {os.fspath(path)} as a PyTorch checkpoint (truncated or corrupted download?): "
                f"{type(err).__name__}: {_unpickler_reason(err)}"
            ) from None


def _unpickler_reason(error: Exception) -> str:
    """The reason in torch's load error, without its advice to load with `weights_only=False`."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.S)
    if match:
        return " ".join(match.group(1).split())
    return " ".join(line for line in text.splitlines() if "weights_only" not in line).strip() or type(error).__name__
