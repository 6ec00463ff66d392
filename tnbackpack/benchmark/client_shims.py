"""Shims that let the BackPACK clients run beside CPU torch 2.13 (tests, benchmark).

- laplace-torch imports torchmetrics, which imports torchvision whenever its
  distribution is installed (BackPACK depends on it). The torchvision wheel on
  PyPI does not load beside the CPU torch wheel (``operator torchvision::nms
  does not exist``). Nothing the tests use needs torchvision, so if importing
  the real one fails, :func:`stub_broken_torchvision` serves an empty stand-in
  package: any attribute is a placeholder that raises when used.
- vivit 1.0.0 calls ``Tensor.symeig``, removed in torch 2.0 (a stub that
  raises is left); :func:`symeig_shim` provides it on ``torch.linalg.eigh``
  while the tests run.
- cockpit 1.0.2 imports ``pkg_resources``: the ``clients`` extra pins
  ``setuptools<81``, which still ships it (nothing to do here).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

_UNAVAILABLE = "torchvision does not load beside this torch build (stubbed for tests)"


class _Placeholder:
    """Stands in for any torchvision object; fails loudly if actually used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(_UNAVAILABLE)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and every ``torchvision.*`` as a stub package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        module.__version__ = "0.0+stub"


def stub_broken_torchvision() -> bool:
    """Replace torchvision by a stub if it does not import; ``True`` if stubbed."""
    if any(isinstance(f, _StubFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401
    except Exception:  # the broken wheel raises RuntimeError, not ImportError
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StubFinder())
        return True
    return False


def _symeig(
    self: Tensor, eigenvectors: bool = False, upper: bool = True
) -> Tuple[Tensor, Tensor]:
    """Torch 1.x's ``Tensor.symeig`` (ascending eigenvalues) by ``linalg.eigh``."""
    values, vectors = torch.linalg.eigh(self, UPLO="U" if upper else "L")
    return values, vectors if eigenvectors else self.new_empty(0)


@contextmanager
def symeig_shim() -> Iterator[None]:
    """``Tensor.symeig`` while inside.

    torch 2 keeps a ``Tensor.symeig`` that only raises "removed"; inside, it is
    torch 1.x's function on ``torch.linalg.eigh``, and restored afterwards.
    """
    existing: Optional[object] = Tensor.__dict__.get("symeig")
    Tensor.symeig = _symeig
    try:
        yield
    finally:
        if existing is None:
            del Tensor.symeig
        else:
            Tensor.symeig = existing
