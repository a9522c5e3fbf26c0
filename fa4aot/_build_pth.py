"""setuptools build hook (``[tool.setuptools.cmdclass]`` in pyproject.toml): writes
``fa4aot_patch.pth`` at the top of the build, so wheels and editable installs put it in
site-packages, where ``site`` runs its one line at every interpreter start.

The line costs one environment lookup while ``$FA4AOT_PATCH`` is unset or 0; set, it imports
:mod:`fa4aot._pth_hook`, which patches FA4's entry points (docs/drop-in.md). Not imported at run
time (only setuptools imports it, while building)."""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

#: The file's name and its one line (a ``.pth`` line starting with ``import`` is executed).
PTH_NAME = "fa4aot_patch.pth"
PTH_LINE = (
    'import os; os.environ.get("FA4AOT_PATCH", "0").strip() not in ("", "0") and __import__("fa4aot._pth_hook")\n'
)


class BuildPy(build_py):
    """setuptools' build_py, plus the drop-in's ``.pth`` file at the top of the build."""

    def run(self) -> None:
        super().run()
        path = Path(self.build_lib) / PTH_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]
