"""Load pickles downloaded from the internet without letting them run code.

The REFER annotations (``refs(unc).p`` and friends) are Python 2 pickles of lists of dicts. A pickle
is a small program: a hostile file can name any importable callable (``os.system``, ``eval``, a
class) and have the loader call it. Only the GLOBAL / STACK_GLOBAL opcodes (and the extension
registry, which leads to the same place) can bring a callable onto the pickle stack, and they all go
through :meth:`pickle.Unpickler.find_class`; refusing every ``find_class`` call therefore leaves
only what the opcodes build by themselves: dict, list, tuple, set, str, bytes, int, float, bool and
None. Nothing in the file is executed before the refusal, since the refused lookup is what would
have produced the callable.

Python 2 byte strings (``str`` in Python 2, which REFER uses for keys and most values) are decoded
as text while loading: as UTF-8, or, when some string in the file is not valid UTF-8, the whole file
is read again as Latin-1 (which never fails). Decoding inside the C unpickler keeps a 50k-ref file
fast; Python 3 ``bytes`` objects stay bytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NoReturn

from perceptio import fs
from perceptio.errors import PerceptioError


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global lookup, naming the file and what it asked for."""

    def __init__(self, file: Any, path: Path | str, encoding: str = "utf-8"):
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise PerceptioError(
            f"{self.path}: refused to load: the pickle asks for {module}.{name}; "
            "only plain containers and scalars (dict, list, tuple, str, bytes, numbers, None) are allowed"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise PerceptioError(f"{self.path}: refused to load: the pickle refers to an outside object ({pid!r})")


def load_plain_pickle(path: str | Path) -> Any:
    """Load ``path`` (a local path or an object-store URL) with :class:`RestrictedUnpickler`; any
    refusal or damage is a PerceptioError."""
    path = fs.as_location(path)
    if not fs.is_file(path):
        raise PerceptioError(f"{path} not found")
    for encoding in ("utf-8", "latin-1"):
        try:
            with fs.open_input(path) as handle:
                return RestrictedUnpickler(handle, path, encoding).load()
        except PerceptioError:
            raise
        except UnicodeDecodeError:
            continue  # a Python 2 byte string that is not UTF-8: read the file again as Latin-1
        except Exception as error:  # a truncated or non-pickle file fails in many ways (EOFError, UnpicklingError, ...)
            raise PerceptioError(f"{path} is not a readable pickle: {type(error).__name__}: {error}") from error
    raise AssertionError("unreachable: Latin-1 decodes every byte string")
