#!/usr/bin/env python3
"""Checks that every C++ and CUDA file of the tree passes .clang-format (standard library only).

    check_format.py CLANG_FORMAT SOURCE_DIR

Exits 1 listing the files clang-format would change (run `clang-format-14 -i FILE` on them).
"""
import os
import subprocess
import sys

FOLDERS = ("src", "include", "daemon", "client", "cli", "tests", "benchmarks", "examples", "fuzz")
SUFFIXES = (".cpp", ".hpp", ".cu", ".cuh")


def main(clang_format: str, root: str) -> int:
    files = []
    for folder in FOLDERS:
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            files += [os.path.join(dirpath, n) for n in sorted(names) if n.endswith(SUFFIXES)]
    unformatted = []
    for f in files:
        run = subprocess.run([clang_format, "--dry-run", "-Werror", f], capture_output=True, text=True)
        if run.returncode != 0:
            unformatted.append(os.path.relpath(f, root))
    for f in unformatted:
        print(f"not formatted: {f}")
    print(f"check_format: {len(files)} files, {len(unformatted)} not formatted")
    return 1 if unformatted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
