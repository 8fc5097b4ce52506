"""`python -m fedsrd_cli.cli ...`: the same as the `fedsrd` console script."""

from fedsrd_cli.cli import main

if __name__ == "__main__":
    main()
