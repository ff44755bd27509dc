"""`python -m bench.distill_eval`: see the package docstring."""

from bench.distill_eval.cli import main

if __name__ == "__main__":
    main()
