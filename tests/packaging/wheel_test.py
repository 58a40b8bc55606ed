"""The Python client's wheel, as a Debian 12 user installs it (stdlib only).

scripts/build-wheel builds it; a fresh venv of Debian's /usr/bin/python3 with
--system-site-packages (for python3-protobuf) installs it offline; `import tensorreg` comes from
the venv, and `python -m tensorreg --version` and the `tensorreg-py` script print the project's
version, the one CMake's project() and python/pyproject.toml also give.

usage: wheel_test.py SOURCE_DIR VERSION   (exits 77, skipped, without /usr/bin/python3's venv)
"""

import os
import re
import subprocess
import sys
import tempfile

PYTHON = "/usr/bin/python3"


def main() -> int:
    source, version = sys.argv[1], sys.argv[2]
    if subprocess.run([PYTHON, "-c", "import ensurepip, setuptools, wheel, pip"], capture_output=True).returncode:
        print("skip: /usr/bin/python3 lacks venv, pip, setuptools or wheel "
              "(apt-get install python3-venv python3-pip python3-setuptools python3-wheel)")
        return 77
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    pyproject = open(os.path.join(source, "python/pyproject.toml")).read()
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    check(declared is not None and declared.group(1) == version,
          f"python/pyproject.toml's version is the project's {version}")

    with tempfile.TemporaryDirectory(prefix="tensorreg-wheel-") as tmp:
        out = os.path.join(tmp, "dist")
        built = subprocess.run([os.path.join(source, "scripts/build-wheel"), out], text=True, capture_output=True)
        print(built.stdout + built.stderr, end="")
        check(built.returncode == 0, "scripts/build-wheel builds")
        wheels = [f for f in os.listdir(out)] if os.path.isdir(out) else []
        check(wheels == [f"tensorreg-{version}-py3-none-any.whl"], f"one pure-Python wheel ({wheels})")
        check(not os.path.exists(os.path.join(source, "python/build")) and
              not os.path.exists(os.path.join(source, "python/tensorreg.egg-info")),
              "the source tree is left clean")
        if failures:
            return 1
        venv = os.path.join(tmp, "venv")
        subprocess.run([PYTHON, "-m", "venv", "--system-site-packages", venv], check=True)
        py = os.path.join(venv, "bin/python")
        pip = subprocess.run([py, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                              os.path.join(out, wheels[0])], text=True, capture_output=True)
        print(pip.stdout + pip.stderr, end="")
        check(pip.returncode == 0, "pip installs the wheel into a fresh venv, offline")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        where = subprocess.run([py, "-c", "import tensorreg; print(tensorreg.__file__)"], text=True,
                               capture_output=True, cwd=tmp, env=env)
        check(where.returncode == 0 and where.stdout.strip().startswith(venv),
              f"import tensorreg comes from the venv ({where.stdout.strip()}{where.stderr.strip()})")
        for cmd in ([py, "-m", "tensorreg", "--version"], [os.path.join(venv, "bin/tensorreg-py"), "--version"]):
            got = subprocess.run(cmd, text=True, capture_output=True, cwd=tmp, env=env)
            check(got.returncode == 0 and got.stdout.strip() == f"tensorreg {version}",
                  f"{' '.join(os.path.basename(c) for c in cmd)} prints 'tensorreg {version}' "
                  f"({got.stdout.strip()}{got.stderr.strip()})")
    if failures:
        print(f"{len(failures)} checks failed")
        return 1
    print("the wheel installs and runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
