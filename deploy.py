#!/usr/bin/env python3
"""vitfold command line: ``python deploy.py --help``. Works from any directory once vitfold is installed."""

from vitfold.entry import main

if __name__ == "__main__":
    main()
