"""heiindex's OpenMP defaults: set on import unless the user chose a wait policy or spin count."""

import os
import subprocess
import sys

import pytest

PRINT = "import heiindex, os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def _imported_env(**env_vars: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_vars)
    done = subprocess.run([sys.executable, "-c", PRINT], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("given", "seen"),
    [
        ({}, "PASSIVE 10000"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # a spin count would override ACTIVE
        ({"GOMP_SPINCOUNT": "0"}, "None 0"),
        ({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "5"}, "passive 5"),
    ],
)
def test_import_sets_both_defaults_only_when_the_user_set_neither(given, seen):
    assert _imported_env(**given) == seen


def test_the_defaults_are_set_before_torch_or_faiss_is_imported():
    """OpenMP reads these variables when its library loads: importing heiindex must not load
    torch or faiss (the CLI imports heiindex first)."""
    code = "import sys, heiindex; print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_cli_imports_heiindex_before_torch_and_faiss():
    code = """
import sys
order = []
class Record:
    def find_spec(self, name, path=None, target=None):
        if name in ("heiindex", "torch", "faiss"):
            order.append(name)
sys.meta_path.insert(0, Record())
import heiindex_cli.main
print(order[0] if order else None)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "heiindex"
