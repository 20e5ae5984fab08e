"""The ``normops`` console script: a module outside the normops package, so that a Ctrl-C while
torch and normops are still importing (seconds) ends as quietly as one during the command."""
import sys


def main():
    try:
        from normops.cli import main as run
    except KeyboardInterrupt:
        print("\nnormops: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
