#!/usr/bin/env python3
"""Checks that every C++ and CUDA file of the tree passes .clang-format (standard library only).

    check_format.py CLANG_FORMAT SOURCE_DIR

Exits 1 listing the files clang-format would change (run `clang-format-14 -i FILE` on them).
"""
import os
import re
import subprocess
import sys

FOLDERS = ("src", "include", "daemon", "client", "cli", "tests", "benchmarks", "examples", "fuzz")
SUFFIXES = (".cpp", ".hpp", ".cu", ".cuh")
# Files per clang-format process: its start costs as much as formatting a few files, so one
# process a file spent most of the check starting processes.
BATCH = 100
# --dry-run -Werror names each file it would change as "PATH:LINE:COL: error: ...".
WOULD_CHANGE = re.compile(r"^(.+?):\d+:\d+: error: ", re.MULTILINE)


def main(clang_format: str, root: str) -> int:
    files = []
    for folder in FOLDERS:
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(SUFFIXES)]
    unformatted = set()
    for start in range(0, len(files), BATCH):
        batch = files[start:start + BATCH]
        run = subprocess.run([clang_format, "--dry-run", "-Werror", *batch], capture_output=True, text=True)
        named = set(WOULD_CHANGE.findall(run.stderr))
        if run.returncode != 0 and not named:
            print(run.stderr, end="")
            print(f"check_format: {clang_format} failed (exit {run.returncode}) naming no file")
            return 1
        unformatted |= named
    for f in sorted(unformatted):
        print(f"not formatted: {os.path.relpath(f, root)}")
    print(f"check_format: {len(files)} files, {len(unformatted)} not formatted")
    return 1 if unformatted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
