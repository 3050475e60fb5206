"""Run a command as on another host: Landlock takes away the folder that holds the API's data
(and everything else beside it) except the folders named, before it execs the command.

    python tests/service/confined.py --hide /tmp/.../stack0/data --allow DIR [--allow DIR ...] -- CMD ...

Every top-level folder of / but the one holding the hidden folder stays usable (the system,
Python, /dev, /proc); of that one only the ``--allow`` folders. Network is not restricted. It
checks itself before the exec: the hidden folder must be unreadable, else exit 3. Prints one line
saying so, which the test reads from the worker's log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

from jobs import sandbox as sb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hide", required=True)
    p.add_argument("--allow", action="append", default=[])
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    abi = sb.landlock_abi()
    if abi < 1:
        sys.exit("no Landlock on this kernel: the worker cannot be confined")
    fs = sb._FS_ALL_V1 | (sb._FS_REFER if abi >= 2 else 0) | (sb._FS_TRUNCATE if abi >= 3 else 0) | \
        (sb._FS_IOCTL_DEV if abi >= 5 else 0)
    attr = sb._RulesetAttr(fs, 0, 0)
    ruleset = sb._sys(sb._SYS_CREATE, ctypes.byref(attr), 8, 0)  # file system only
    hidden = os.path.realpath(a.hide)
    top = "/" + hidden.strip("/").split("/")[0]
    allowed = [os.path.join("/", e) for e in os.listdir("/") if os.path.join("/", e) != top]
    # the interpreter's own tree and this checkout, when they lie beside the hidden one (a
    # virtualenv or a clone in /tmp)
    repo = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    allowed += [p for p in {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix), repo}
                if os.path.commonpath([p, hidden]) not in (p, hidden)]
    for path in allowed + [os.path.realpath(d) for d in a.allow]:
        if os.path.commonpath([path, hidden]) == hidden:
            sys.exit(f"--allow {path} would expose the hidden folder")
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rights = fs if os.path.isdir(path) else fs & sb._FILE_RIGHTS
            sb._sys(sb._SYS_ADD, ruleset, 1, ctypes.byref(sb._PathBeneath(rights, fd)), 0)
        finally:
            os.close(fd)
    if sb._libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        sys.exit("could not set no_new_privs")
    sb._sys(sb._SYS_RESTRICT, ruleset, 0)
    os.close(ruleset)
    try:
        os.listdir(hidden)
    except PermissionError:
        print(f"confined: {hidden} is not readable here (PermissionError)", flush=True)
    else:
        print(f"NOT confined: {hidden} is readable", flush=True)
        sys.exit(3)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
