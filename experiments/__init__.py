"""Experiments: one-off searches and comparisons behind a design decision (not tests, not benchmarks).

Each file runs as ``python experiments/<name>.py`` and records its findings in its docstring;
``_common`` holds what they share. Not part of the installed package.
"""
