"""Upload validation before anything is queued.

Cheap checks (form fields, config JSON against the library's ``CalibConfig``, arch name) run
in the API process. Checks that need torch (weights vs arch, decoding a sample of images, one
forward pass) run in a sandboxed child process (``jobs.sandbox``), one fresh child per check:
it sees only that upload's folder, has no network and a memory cap, and answers in JSON, so
neither a hostile upload nor a child it took over can reach the API process, another tenant's
files or a later check. Children are forked by a zygote that imported torch once (``jobs.zygote``),
so a check starts in milliseconds and does not pay for the import.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from clcalib.config import MAX_CONFIG_ITEMS, CalibConfig, count_items
from jobs.sandbox import Child, ChildFailed, Jail, zygote_for
from jobs.settings import Settings
from service.errors import ApiError

log = logging.getLogger("clcalib.service")
CHECK = "service.checks:check_job"


class Validator:
    """At most ``validate_workers`` checks at once, at most ``validate_slots_per_tenant`` of them
    one tenant's (its others wait their turn; other tenants' checks do not wait behind them)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self._slots: asyncio.Semaphore | None = None
        self._tenants: dict[str, asyncio.Semaphore] = {}
        self._archs: list[str] | None = None
        self.closed = False

    def _jail(self, child: Child, read: list[str]) -> Jail:
        return Jail(read=read, tmp=os.path.join(child.cwd, "tmp"), memory_bytes=self.s.validate_memory_bytes,
                    uid=self.s.sandbox_uid)

    def close(self) -> None:
        self.closed = True  # a check's child killed from now on is the server stopping, not the upload

    def _tenant_slots(self, tenant: str) -> asyncio.Semaphore:
        if tenant not in self._tenants:
            if len(self._tenants) > 10_000:  # idle ones: forget them
                self._tenants = {t: sem for t, sem in self._tenants.items() if sem.locked()}
            self._tenants[tenant] = asyncio.Semaphore(self.s.validate_slots_per_tenant)
        return self._tenants[tenant]

    async def _run(self, child: Child, jail: Jail, kwargs: dict, timeout: float):
        try:
            return await run_in_threadpool(child.run, jail, kwargs, timeout, None, self.s.sandbox == "off")
        except ChildFailed as e:
            cap = f"{self.s.validate_memory_bytes / 2**30:.1f} GiB"
            if e.kind == "timeout":
                raise ApiError(422, "check_timeout",
                               f"checking the upload took longer than {timeout:.0f}s (CLCALIB_VALIDATE_TIMEOUT_S); "
                               "send fewer or smaller images, or an archive whose files can be read in name "
                               "order") from None
            if e.kind == "memory":
                raise ApiError(422, "check_memory",
                               f"checking the upload needed more memory than the cap of {cap} "
                               "(CLCALIB_VALIDATE_MEMORY_BYTES): fewer or smaller images after preprocessing "
                               "(config.preprocess.resize/crop), or a smaller model") from None
            if e.kind == "sandbox":
                log.error("upload check not run: %s", e.message)
                raise ApiError(503, "sandbox_unavailable", f"uploads cannot be checked safely on this server: "
                               f"{e.message}", headers={"Retry-After": "60"}) from None
            if e.kind == "exception":
                raise RuntimeError(f"the upload check failed: {e.message}") from None
            if self.closed or "killed by SIGTERM" in e.message:  # the server stopping, not the upload
                raise ApiError(503, "shutting_down", "the server stopped while checking this upload; send it "
                               "again", headers={"Retry-After": "10"}) from None
            raise ApiError(422, "check_crashed",
                           f"the process checking this upload died ({e.message}; its memory cap is {cap}): a "
                           "file that crashes the decoder, or out of memory; check the files decode "
                           "locally") from None

    async def warm(self) -> None:
        """Start the check processes' zygote (it imports torch once) so no check waits for it."""
        zygote_for(CHECK)

    async def archs(self) -> list[str]:
        """The registry's architectures, from a check process once the zygote's imports are done
        (so a service that answers them checks an upload without waiting for torch)."""
        if self._archs is None:
            child = Child(CHECK)
            try:
                await run_in_threadpool(child.wait_ready, 300)
                if isinstance(child.info, dict):
                    self._archs = [str(a) for a in child.info.get("archs", [])]
            except ChildFailed as e:
                log.warning("a check process did not start: %s", e.message)
            finally:
                child.close()
            if self._archs is None:
                raise ApiError(503, "validator_unavailable", "the validator did not start: no check process "
                               "answered; see the API's log")
        return self._archs

    async def check_job(self, *, tenant: str, **kwargs) -> dict:
        s = self.s
        if self._slots is None:
            self._slots = asyncio.Semaphore(s.validate_workers)
        inputs = {str(Path(v).parent) for k, v in kwargs.items() if k in ("model", "calibration", "evaluation", "labels")
                  and v is not None}
        async with self._tenant_slots(tenant), self._slots:
            child = Child(CHECK)
            res = await self._run(child, self._jail(child, sorted(inputs)),
                                  {**kwargs, "limits": s.data_limits, "sample": s.validate_sample,
                                   "worker_memory_bytes": s.worker_memory_bytes},
                                  s.validate_timeout_s)
        if not isinstance(res, dict) or not res.get("ok"):
            res = res if isinstance(res, dict) else {}
            raise ApiError(422, str(res.get("code", "bad_upload"))[:60], str(res.get("message", "the upload was refused")),
                           field=str(res.get("field", "model"))[:60])
        return res


def parse_num_classes(raw: str | None) -> int:
    if raw is None or not raw.strip():
        raise ApiError(422, "missing_field", "form field 'num_classes' is required (the model's output classes)",
                       field="num_classes")
    try:
        n = int(raw.strip())
    except ValueError:
        raise ApiError(422, "bad_num_classes", f"num_classes must be an integer, got {raw[:40]!r}",
                       field="num_classes") from None
    if not 1 <= n <= 100_000:
        raise ApiError(422, "bad_num_classes", f"num_classes must be between 1 and 100000, got {n}",
                       field="num_classes")
    return n


def parse_config(raw: str | None) -> CalibConfig:
    if raw is None or not raw.strip():
        return CalibConfig()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError(422, "bad_config_json", f"config is not valid JSON ({e}); send a JSON object",
                       field="config") from None
    except RecursionError:
        raise ApiError(422, "bad_config_json", "config is nested too deeply; send a flat JSON object of config fields",
                       field="config") from None
    except ValueError as e:  # an integer of thousands of digits (Python's int conversion limit)
        raise ApiError(422, "bad_config_json", f"config holds a number that cannot be read ({str(e)[:80]})",
                       field="config") from None
    if not isinstance(data, dict):
        raise ApiError(422, "bad_config", f"config must be a JSON object, got {type(data).__name__}",
                       field="config")
    if count_items(data, MAX_CONFIG_ITEMS) > MAX_CONFIG_ITEMS:  # before pydantic builds an error per key
        raise ApiError(422, "bad_config", f"config holds more than {MAX_CONFIG_ITEMS} keys and list values, more than "
                       "any valid config has (CalibConfig, every field set); send only the fields you set",
                       field="config")
    try:
        return CalibConfig.model_validate(data)
    except ValidationError as e:
        errors = [
            {"loc": ["config", *map(str, err["loc"])], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_input=False, include_context=False)
        ]
        first = errors[0]
        where = ".".join(first["loc"][1:]) or "config"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ApiError(422, "bad_config", f"config.{where}: {first['msg']}{more}".replace("config.config", "config"),
                       field="config", errors=errors) from None


def parse_arch(raw: str | None, known: list[str]) -> str:
    if raw is None or not raw.strip():
        raise ApiError(422, "missing_field", f"form field 'arch' is required with state_dict weights; one of "
                       f"{', '.join(known)}. Or upload the model as a torch.export program (.pt2) without arch",
                       field="arch")
    arch = raw.strip()
    if arch not in known:
        raise ApiError(422, "unknown_arch", f"unknown arch {arch[:60]!r}; supported: {', '.join(known)} "
                       "(GET /v1/archs)", field="arch")
    return arch
