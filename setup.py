"""Only for the one file pyproject.toml cannot place: `bov-lm-eval.pth` in site-packages (bov/lm_eval_hook.py)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path(__file__).parent / "bov-lm-eval.pth"), str(Path(self.build_lib) / "bov-lm-eval.pth"))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / "bov-lm-eval.pth")]


setup(cmdclass={"build_py": BuildWithPth})
