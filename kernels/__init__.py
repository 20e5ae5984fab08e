"""normops.kernels: the Triton kernels (the only code that imports triton). Nothing runs at import."""

if __name__ == "kernels":
    # This folder installs as normops.kernels. A Python started in the repository root (`python -m
    # pytest`, `python -c ...`) has that root first on sys.path and would find this folder under its
    # own name, shadowing PyPI's `kernels` package (which transformers imports). Hand the name over
    # to whatever `kernels` the rest of sys.path holds, or fail as if this folder were not there.
    import os
    import sys

    def _hand_over():
        root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec("kernels", None) if find_spec else None
                if spec is not None:
                    break
            else:
                raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        finally:
            sys.path[:] = saved
        import importlib.util
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # what `import kernels` returns once this file has run
        spec.loader.exec_module(module)

    _hand_over()
