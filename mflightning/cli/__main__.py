"""`python -m mflightning.cli ...` is the `mflightning` command."""
from mflightning.cli import main

if __name__ == "__main__":
    main()
