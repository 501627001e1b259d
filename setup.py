"""Build hook: ship ``litgpt_plop.pth`` at the root of site-packages, for a wheel and an editable install alike.

Everything else about the package is in ``pyproject.toml``. The ``.pth`` line is what makes ``litgpt finetune
--plugin plop`` reach the plugin: at interpreter start it installs the tiny import hook of
``litgpt_plop.commands.litgpt_hook`` (stdlib only: no torch, no litgpt), unless ``LITGPT_PLOP_DISABLE`` is set. Being a file
of this distribution, it is listed in its RECORD, so ``pip uninstall litgpt-plop`` removes it.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "litgpt_plop.pth"
# One line: site.py executes lines that start with "import". `__editable__.*.pth` (which makes the package importable
# in an editable install) sorts before this name, so the package is importable when this line runs. `sys.argv` is
# already set then: any interpreter but LitGPT's `litgpt` console script pays for an environment lookup and a string
# comparison, and imports nothing (`os` and `sys` are loaded by `site` itself).
PTH_LINE = (
    'import os, sys; os.environ.get("LITGPT_PLOP_DISABLE", "") in ("", "0")'
    ' and os.path.basename(sys.argv[0]) in ("litgpt", "litgpt.exe", "litgpt-script.py")'
    ' and __import__("litgpt_plop.commands.litgpt_hook").commands.litgpt_hook.install()\n'
)


class BuildPyWithPth(build_py):
    """``build_py`` that also writes ``litgpt_plop.pth`` where the wheel's site-packages root is assembled."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # PEP 660 editable wheel: setuptools points `install_lib` at the unpacked wheel it zips, whose root is the
            # site-packages root; build_lib is a temporary directory that is not shipped.
            root = Path(self.get_finalized_command("install").install_lib)
            if not any(root.glob("*.dist-info")):
                raise RuntimeError(f"litgpt-plop: {root} does not look like the editable wheel; cannot add {PTH_NAME}")
        else:
            root = Path(self.build_lib)
        root.mkdir(parents=True, exist_ok=True)
        (root / PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
        return outputs


setup(cmdclass={"build_py": BuildPyWithPth})
