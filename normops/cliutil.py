"""What every ``normops`` command shares: the dtype and device options, counts, error lines, the
aligned text table, and output files checked before any work and written whole or not at all.

Imports nothing of normops (only the standard library and torch), so the command modules
(``normops.cli``) and the packages that register their own commands (``normops.models``,
``normops.lessons``, ``normops.guide``, ``normops.inspect``) all import it without a circle.
"""
import argparse
import contextlib
import os
import tempfile

import torch

# the dtypes --dtype takes (check, bench), and the short names it also accepts
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64",
                 "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_arg(text):
    """argparse type of ``--dtype``: a name of DTYPES or an alias, as the name."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return name


def device_arg(text):
    """argparse type of ``--device``: a torch.device."""
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"bad device {text!r}: {e}")


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int_arg(text):
    """argparse type of a count option (``--reps``, ``--steps``, ``--batch-size``...)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def error_text(e):
    """``Type: first line of the message`` (at most 300 characters; just ``Type`` without a message)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}".rstrip(": ")


def text_table(headers, rows, right=()):
    """Rows of strings as aligned columns under a header and a rule; columns in `right` right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, headers)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def writable_folder(path, what="--out"):
    """Create folder ``path`` if missing and check a file can be written in it, before any work
    starts (a run that fails at its last step wastes the run); ValueError (usage) when not."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{what} {path}: not a writable folder ({e.strerror or e})") from None
    return path


def writable_file(path, what):
    """Check that file ``path`` can be written (its folder exists and takes a file), before any work."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: is a folder, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: no such directory {folder}")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {folder} ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def atomic_output(path):
    """``with atomic_output(path) as tmp: write(tmp)``: the file appears at ``path`` whole or not at
    all (an error or Ctrl-C while writing leaves no partial file)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as open(path, "w") would create it (mkstemp's file is private)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_figure(fig, path, **savefig_kwargs):
    """``fig.savefig(path)``, the file whole or not at all (``atomic_output``)."""
    with atomic_output(path) as tmp:  # tmp keeps path's extension: savefig's format
        fig.savefig(tmp, **savefig_kwargs)
