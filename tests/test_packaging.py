"""setup.py installs every package of the source tree: a package missing from its explicit list
works in an editable install and is absent from a wheel (normops.ops once was)."""
import ast
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwarg(name):
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text())) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == name))


def test_setup_lists_every_package():
    listed = set(_setup_kwarg("packages"))
    in_tree = {p for p in find_packages(str(ROOT), include=["normops", "normops.*"])}
    in_tree |= {"normops.kernels." + p for p in find_packages(str(ROOT / "kernels"))} | {"normops.kernels"}
    assert in_tree <= listed, sorted(in_tree - listed)
