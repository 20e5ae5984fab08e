"""The ``normops`` console script: a module outside the normops package, so that a Ctrl-C while
torch and normops are still importing (seconds) ends as quietly as one during the command.

SIGINT is held during the imports, not caught as KeyboardInterrupt there: an interrupt inside
torch's or numpy's C-level initialisation can be swallowed, or leave numpy half-imported (an
ImportError, or a command that runs on with numpy broken)."""
import signal
import sys


def main():
    interrupted = []
    held = signal.getsignal(signal.SIGINT)
    if held is signal.default_int_handler:  # not where SIGINT is ignored (a background job, nohup)
        signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        from normops.cli import main as run
    finally:
        signal.signal(signal.SIGINT, held)
    if interrupted:
        print("\nnormops: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
