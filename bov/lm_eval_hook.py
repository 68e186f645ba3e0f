"""Makes `lm_eval --model bov` work: registers bov's model class with lm-eval when lm-eval loads its models.

Imported at interpreter start by the one-line `bov-lm-eval.pth` that installing bov puts in site-packages
(lm-eval has no plugin entry points). It imports nothing heavy: a finder waits for `lm_eval.models`, and after
that module has run, registers the name `bov` lazily (the class loads only when a run asks for it).
"""

import importlib.abc
import importlib.machinery
import sys

TARGET = "lm_eval.models"


class _RegisterAfterLoad(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from lm_eval.api.registry import model_registry

            if "bov" not in model_registry:
                model_registry.register("bov", target="bov.lmeval:BovLM")

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterAfterLoad) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLoad())
