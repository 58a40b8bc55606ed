"""`cmake --install` of a built tree, checked as a packager and a user would (stdlib only).

1. Into a DESTDIR with prefix /usr: every part is there (daemon, CLI, C++ client library and
   its CMake package, man page, bash completion, docs, both systemd units naming /usr/bin, the
   sysusers.d entry), and the installed binaries print the project's version.
2. Into a prefix: a consumer project (tests/packaging/consumer) finds the package with
   find_package(tensorreg), builds with -Werror, links the client library (and tensorreg::cuda
   with its device_count() when the tree was built with CUDA) and runs.
3. `systemd-analyze verify` of the installed units (skipped, saying so, without systemd-analyze).

usage: install_test.py BUILD_DIR SOURCE_DIR VERSION CUDA(ON|OFF)
"""

import os
import shutil
import subprocess
import sys
import tempfile


def run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def main() -> int:
    build, source, version, cuda = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "ON"
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory(prefix="tensorreg-install-") as tmp:
        # 1. DESTDIR install, as a distribution package is built.
        dest = os.path.join(tmp, "dest")
        run(["cmake", "--install", build, "--prefix", "/usr"], env=dict(os.environ, DESTDIR=dest))
        usr = os.path.join(dest, "usr")
        expected = [
            "bin/tensorregd", "bin/tensorreg",
            "include/tensorreg/client/connection.hpp", "include/tensorreg/hash/sha256.hpp",
            "share/man/man1/tensorreg.1", "share/bash-completion/completions/tensorreg",
            "share/zsh/site-functions/_tensorreg",
            "share/doc/tensorreg/README.md", "share/doc/tensorreg/wire-format.md",
            "share/doc/tensorreg/registration.md", "share/doc/tensorreg/python.md",
            "lib/systemd/system/tensorregd.service", "lib/systemd/user/tensorregd.service",
            "lib/sysusers.d/tensorreg.conf",
        ]
        for rel in expected:
            check(os.path.isfile(os.path.join(usr, rel)), f"installs {rel}")
        libs = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(usr, "lib")) for f in fs]
        names = {os.path.basename(p) for p in libs}
        for lib in ["libtensorreg.a", "libtensorreg_client.a", "tensorreg-config.cmake", "tensorreg-targets.cmake"]:
            check(lib in names, f"installs {lib}")
        check(("libtensorreg_cuda.a" in names) == cuda,
              "installs libtensorreg_cuda.a" if cuda else "installs no CUDA library in a CPU build")
        system_unit = open(os.path.join(usr, "lib/systemd/system/tensorregd.service")).read()
        user_unit = open(os.path.join(usr, "lib/systemd/user/tensorregd.service")).read()
        check("ExecStart=/usr/bin/tensorregd --socket /run/tensorreg/tensorregd.sock --socket-group tensorreg "
              "--stable-bytes 50%" in system_unit, "the system unit runs /usr/bin/tensorregd on /run/tensorreg")
        check("RuntimeDirectory=tensorreg" in system_unit and "User=tensorreg" in system_unit,
              "the system unit has its runtime directory and its own user")
        check("ExecStart=/usr/bin/tensorregd --socket %t/tensorreg/tensorregd.sock --stable-bytes 50%" in user_unit,
              "the user unit runs /usr/bin/tensorregd in $XDG_RUNTIME_DIR")
        check("@" not in system_unit + user_unit, "no unexpanded @VARIABLE@ in the units")
        for tool in ["tensorregd", "tensorreg"]:
            out = run([os.path.join(usr, "bin", tool), "--version"]).stdout.strip()
            check(out == f"{tool} {version}", f"{tool} --version says {version} ({out!r})")

        # 2. A prefix install and a consumer of it.
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", build, "--prefix", prefix])
        consumer_build = os.path.join(tmp, "consumer-build")
        run(["cmake", "-S", os.path.join(source, "tests/packaging/consumer"), "-B", consumer_build,
             f"-DCMAKE_PREFIX_PATH={prefix}", f"-DTENSORREG_CONSUMER_CUDA={'ON' if cuda else 'OFF'}"])
        built = subprocess.run(["cmake", "--build", consumer_build], text=True, capture_output=True)
        check(built.returncode == 0, "a find_package(tensorreg) consumer builds and links" +
              ("" if built.returncode == 0 else ":\n" + built.stdout[-4000:] + built.stderr[-4000:]))
        if built.returncode == 0:
            ran = subprocess.run([os.path.join(consumer_build, "consumer"), os.path.join(tmp, "nobody.sock")],
                                 text=True, capture_output=True)
            print(ran.stdout + ran.stderr, end="")
            check(ran.returncode == 0, "the consumer runs")
            check(("cuda devices" in ran.stdout) == cuda,
                  "the consumer called tensorreg::cuda::device_count()" if cuda else "the consumer has no CUDA part")

        # 3. The units as systemd reads them.
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            print("skip systemd-analyze verify: no systemd-analyze (apt-get install systemd)")
        else:
            runtime = os.path.join(tmp, "xdg-runtime")
            os.mkdir(runtime, 0o700)
            for kind in ["system", "user"]:
                unit = os.path.join(prefix, "lib/systemd", kind, "tensorregd.service")
                args = [analyze, "verify", "--man=no"] + (["--user"] if kind == "user" else []) + [unit]
                # A user manager needs $XDG_RUNTIME_DIR, which a CI shell may not have.
                env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
                got = subprocess.run(args, text=True, capture_output=True, env=env)
                # Unknown keys and bad values are warnings that name the file, with exit 0.
                said = [line for line in (got.stdout + got.stderr).splitlines() if "tensorregd.service" in line]
                print(f"systemd-analyze verify ({kind}): exit {got.returncode}\n" + got.stdout + got.stderr, end="")
                check(got.returncode == 0 and not said,
                      f"systemd-analyze verify finds nothing wrong in the {kind} unit")
        sysusers = shutil.which("systemd-sysusers")
        if sysusers is None:
            print("skip systemd-sysusers: not installed")
        else:
            root = os.path.join(tmp, "sysroot")
            os.makedirs(os.path.join(root, "etc"))
            run([sysusers, f"--root={root}", os.path.join(prefix, "lib/sysusers.d/tensorreg.conf")])
            passwd = open(os.path.join(root, "etc/passwd")).read()
            group = open(os.path.join(root, "etc/group")).read()
            check(passwd.startswith("tensorreg:") and group.startswith("tensorreg:"),
                  "systemd-sysusers makes the system unit's user and group from the installed entry")

    if failures:
        print(f"{len(failures)} checks failed")
        return 1
    print("all install checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
