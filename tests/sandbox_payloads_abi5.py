"""``sandbox_payloads`` in a child that confines itself as on a kernel whose Landlock has no
scopes (ABI < 6: Linux < 6.12, e.g. Ubuntu 24.04's 6.8): signals are not scoped to the sandbox."""

import sys

import jobs.sandbox

for _m in {jobs.sandbox, sys.modules["__main__"]}:  # a zygote runs jobs.sandbox as __main__
    if hasattr(_m, "landlock_abi"):
        _m.landlock_abi = lambda real=_m.landlock_abi: min(real(), 5)

from sandbox_payloads import reach, signal_group  # noqa: E402,F401
