"""``python -m safepoint``: the ``safepoint`` command line."""

from safepoint.cli import main

if __name__ == "__main__":
    main()
