"""`python -m tensorreg`: the daemon commands of the `tensorreg` CLI, for people without the C++
build. Output mirrors cli/daemon_commands.cpp; errors print "tensorreg: <message> (<CODE>)" and
exit 1, usage errors exit 2.

    python -m tensorreg put FILES.safetensors... [--policy cache|warm|pinned|durable]
    python -m tensorreg ls
    python -m tensorreg show ID
    python -m tensorreg index ID
    python -m tensorreg stats
    python -m tensorreg --version
(all take --socket PATH and --json)
"""

from __future__ import annotations

import json
import sys
import time

from . import Error, Store, __version__

USAGE = """usage: python -m tensorreg <command> [args]
daemon commands (all take --socket PATH and --json):
  put FILES.safetensors... [--policy cache|warm|pinned|durable]
                                  store the files in the daemon's stable DRAM
  ls                              the artifacts the daemon holds
  show ID                         an artifact's descriptor and tensors
  index ID                        an artifact's canonical index JSON
  stats                           counters
  --version                       print the version
"""


class _Usage(Exception):
    pass


def _parse(args):
    opts = {"socket": None, "json": False, "policy": None, "positional": []}  # policy: the daemon's default
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--json":
            opts["json"] = True
        elif a in ("--socket", "--policy"):
            if i + 1 >= len(args):
                raise _Usage(f"{a} needs a value")
            opts[a[2:]] = args[i + 1]
            i += 1
        elif a.startswith("--"):
            raise _Usage(f"unknown option {a}")
        else:
            opts["positional"].append(a)
        i += 1
    return opts


def human_bytes(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    v, u = float(n), 0
    while v >= 1024 and u < 4:
        v /= 1024
        u += 1
    return f"{n} B" if u == 0 else f"{v:.1f} {units[u]}"


def _descriptor_json(d: dict) -> dict:
    return {k: d[k] for k in ("artifact_id", "index_multihash", "data_multihash", "total_size", "id_kind")}


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def cmd_put(store: Store, o) -> int:
    if not o["positional"]:
        raise _Usage("usage: python -m tensorreg put FILES.safetensors... [--policy P]")
    started = time.monotonic()
    art = store.put_safetensors(o["positional"], policy=o["policy"] or None)
    seconds = time.monotonic() - started
    if o["json"]:
        j = _descriptor_json(art.descriptor)
        j.update(existed=art.existed, registration_id=art.registration_id, seconds=seconds)
        print(_dumps(j))
    else:
        print(f"put {art.artifact_id}\n  total_size {art.total_size} ({human_bytes(art.total_size)})\n"
              f"  existed    {'true' if art.existed else 'false'}\n  time       {seconds:.3f} s")
    return 0


def cmd_ls(store: Store, o) -> int:
    artifacts = store.list()
    if o["json"]:
        print(_dumps([dict(_descriptor_json(a), tiers=a["tiers"], lease_count=a["lease_count"]) for a in artifacts]))
        return 0
    print(f"{'ARTIFACT':<119} {'SIZE':>12} {'LEASES':>7}  TIERS")
    for a in artifacts:
        print(f"{a['artifact_id']:<119} {human_bytes(a['total_size']):>12} {a['lease_count']:>7}  "
              f"{','.join(a['tiers'])}")
    print(f"{len(artifacts)} artifacts")
    return 0


def cmd_show(store: Store, o, index_only: bool) -> int:
    if len(o["positional"]) != 1:
        raise _Usage("usage: python -m tensorreg index ID" if index_only else "usage: python -m tensorreg show ID")
    d, index = store.index(o["positional"][0])
    if index_only:
        print(json.dumps(index, separators=(",", ":"), sort_keys=True, ensure_ascii=True))
        return 0
    if o["json"]:
        print(_dumps(dict(_descriptor_json(d), index=index)))
        return 0
    print(f"artifact   {d['artifact_id']}\nkind       {d['id_kind']}\n"
          f"total_size {d['total_size']} ({human_bytes(d['total_size'])})\n"
          f"index      {d['index_multihash']}\ndata       {d['data_multihash']}")
    print(f"\n{'TENSOR':<48} {'OFFSET':>12} {'BYTES':>12}  {'DTYPE':<20} SHAPE")
    for name, e in index.items():
        print(f"{name:<48} {e[0]:>12} {e[1]:>12}  {e[4]:<20} {_dumps(e[2])}")
    return 0


def cmd_stats(store: Store, o) -> int:
    s = store.stats()
    if o["json"]:
        print(_dumps(s))
        return 0
    print(f"artifacts     {s['artifacts']}\npending       {s['pending_registrations']}\nleases        {s['leases']}\n"
          f"regions       {s['regions']}\nopen mappings {s['open_mappings']}\nconnections   {s['connections']}")
    for tier, t in s["tiers"].items():
        print(f"tier {tier:<12} {human_bytes(t['bytes']):>12} in {t['artifacts']} artifacts")
    return 0


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        (sys.stdout if args else sys.stderr).write(USAGE)
        return 0 if args else 2
    if args[0] in ("--version", "version"):
        print(f"tensorreg {__version__}")
        return 0
    command, rest = args[0], args[1:]
    commands = {"put", "ls", "show", "index", "stats"}
    if command not in commands:
        sys.stderr.write(f"tensorreg: unknown command '{command}'\n{USAGE}")
        return 2
    try:
        o = _parse(rest)
        with Store(o["socket"]) as store:
            if command == "put":
                return cmd_put(store, o)
            if command == "ls":
                return cmd_ls(store, o)
            if command in ("show", "index"):
                return cmd_show(store, o, command == "index")
            return cmd_stats(store, o)
    except _Usage as e:
        sys.stderr.write(f"tensorreg: {e}\n")
        return 2
    except Error as e:
        sys.stderr.write(f"tensorreg: {e.message} ({e.code_name})\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
