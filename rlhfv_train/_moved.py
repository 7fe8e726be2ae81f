"""The names of before the package was laid out by concern keep working, with a FutureWarning saying where they went:
module names through one table and one import hook (installed by rlhfv_train/__init__.py): `import rlhfv_train.train`
gives rlhfv_train.ddpo, `python -m rlhfv_train.evaluate` runs `python -m rlhfv_train.eval`; renamed functions through
old_names(), a module __getattr__ (rlhfv_train.sft.warmup is rlhfv_train.run.sft.fine_tune)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "rlhfv_train.train": "rlhfv_train.ddpo",
    "rlhfv_train.refcache": "rlhfv_train.ddpo.reference_scores",
    "rlhfv_train.rollouts": "rlhfv_train.grpo.rollouts",
    "rlhfv_train.rewards": "rlhfv_train.grpo.rewards",
    "rlhfv_train.evaluate": "rlhfv_train.eval",
    "rlhfv_train.synthetic": "rlhfv_train.data.synthetic",
    "rlhfv_train.data.weights": "rlhfv_train.data.token_weights",
    "rlhfv_train.trl_dropin": "rlhfv_train.integrations.trl",
    "rlhfv_train.sft": "rlhfv_train.run.sft",
    "rlhfv_train.checkpoint": "rlhfv_train.run.checkpoint",
    "rlhfv_train.distributed": "rlhfv_train.run.distributed",
    "rlhfv_train.plots": "rlhfv_train.run.plots",
    "rlhfv_train.cli": "rlhfv_train.run.cli",
    "rlhfv_train.ablation": "experiments.ablation",      # experiments/ of a clone (not installed)
    "rlhfv_train.grpo_sweep": "experiments.grpo_sweep",
}

def old_names(module: str, table: dict[str, str]):
    """A module-level __getattr__ for `module`'s old names: table maps each to its new name in the module, or to
    'other.module:name'."""
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = table[name].rpartition(":")
        where = where or module
        warnings.warn(_message(f"{module}.{name}", f"{where}.{new}"), FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(where), new)
    return __getattr__


def _message(old: str, new: str) -> str:
    return f"{old} moved to {new}; the old name will be removed"


def _target(old: str):
    new = MOVED[old]
    try:
        return importlib.import_module(new)
    except ModuleNotFoundError as exc:
        if exc.name != new.split(".")[0]:
            raise
        raise ModuleNotFoundError(f"{old} moved to {new.replace('.', '/')}.py of the repository, which is not "
                                  f"installed: run `python -m {new}` from a clone's root", name=old) from None


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:  # import: the import system returns what sys.modules then holds
        old = module.__name__
        warnings.warn(_message(old, MOVED[old]), FutureWarning, stacklevel=2)
        sys.modules[old] = _target(old)

    def get_code(self, old: str):  # python -m OLD: run the new module as __main__
        source = (f"import runpy, warnings\nwarnings.warn({_message(old, MOVED[old])!r}, FutureWarning)\n"
                  f"runpy.run_module({MOVED[old]!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{old}>", "exec")


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _MovedLoader())
        return None


def install() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
