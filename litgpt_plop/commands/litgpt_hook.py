"""The start-up half of ``litgpt finetune --plugin``: a ``sys.meta_path`` finder, installed by ``litgpt_plop.pth``.

Every interpreter with litgpt-plop installed runs the one line of ``litgpt_plop.pth`` at start-up, which calls
``install()`` here. So this module imports nothing but ``os`` and ``sys`` (both already loaded by ``site``): no
torch, no litgpt. The finder answers for a single module name, ``litgpt.__main__`` (what LitGPT's ``litgpt``
console script imports); it lets LitGPT's own loader run the module as usual, then hands the loaded module to
``litgpt_plop.commands.litgpt_command.extend``, which wraps its ``main``. Any other import is declined at the cost of one
string comparison.

``LITGPT_PLOP_DISABLE`` set to anything but ``""`` or ``"0"`` switches it off (checked in the ``.pth`` line and
again when ``litgpt.__main__`` loads).
"""

import os
import sys

TARGET = "litgpt.__main__"
DISABLE_VARIABLE = "LITGPT_PLOP_DISABLE"


def disabled() -> bool:
    """Whether the user switched the ``litgpt`` command hook off."""
    return os.environ.get(DISABLE_VARIABLE, "") not in ("", "0")


class _ExtendingLoader:
    """LitGPT's own loader for ``litgpt.__main__``, followed by ``extend``; everything else is delegated to it."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        # get_code, get_source, is_package ...: ``python -m litgpt`` (runpy) and tracebacks use these, unchanged
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)  # type: ignore[attr-defined]

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)  # type: ignore[attr-defined]
        if disabled():
            return
        try:
            from litgpt_plop.commands.litgpt_command import extend

            extend(module)
        except Exception as error:  # noqa: BLE001 - whatever goes wrong here, stock LitGPT must still run
            print(f"litgpt-plop: `litgpt finetune --plugin` is not active ({type(error).__name__}: {error})", file=sys.stderr)


class LitgptPlopFinder:
    """Finds ``litgpt.__main__`` through the other finders and wraps its loader; declines every other name."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ExtendingLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), unless switched off."""
    if disabled() or any(isinstance(finder, LitgptPlopFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, LitgptPlopFinder())
