"""Upload validation before anything is queued.

Cheap checks (form fields, config JSON against the library's ``CalibConfig``, arch name) run
in the API process. Checks that need torch (weights vs arch, decoding a sample of images, one
forward pass) run in a small pool of spawned child processes, so the API process never imports
torch; a check that crashes or hangs its child costs that child, not the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from pydantic import ValidationError

from clcalib.config import MAX_CONFIG_ITEMS, CalibConfig, count_items
from jobs.settings import Settings
from service import checks
from service.errors import ApiError

log = logging.getLogger("clcalib.service")


class Validator:
    """Checks run in warm child processes, one check per child at a time (at most
    ``validate_workers`` at once; more wait their turn). A check that times out or crashes costs
    its own child only: the others keep running their checks."""

    def __init__(self, settings: Settings):
        self.s = settings
        self._idle: list[ProcessPoolExecutor] = []
        self._busy: set[ProcessPoolExecutor] = set()
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None
        self._archs: list[str] | None = None

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=checks.init_child, max_tasks_per_child=200)

    def _take(self) -> ProcessPoolExecutor:
        with self._lock:
            child = self._idle.pop() if self._idle else self._new()
            self._busy.add(child)
            return child

    def _give_back(self, child: ProcessPoolExecutor, healthy: bool) -> None:
        with self._lock:
            self._busy.discard(child)
            if healthy:
                self._idle.append(child)
                return
        _kill(child)

    def close(self) -> None:
        with self._lock:
            children, self._idle, self._busy = [*self._idle, *self._busy], [], set()
        for child in children:
            _kill(child)

    async def _call(self, fn, /, timeout: float | None = None, **kwargs):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.s.validate_workers)
        async with self._slots:
            child = self._take()
            healthy = False
            try:
                fut = child.submit(fn, **kwargs)
                result = await asyncio.wait_for(asyncio.wrap_future(fut), timeout or self.s.validate_timeout_s)
                healthy = True
                return result
            except (asyncio.TimeoutError, TimeoutError):
                raise ApiError(422, "check_timeout",
                               f"checking the upload took longer than {self.s.validate_timeout_s:.0f}s "
                               "(CLCALIB_VALIDATE_TIMEOUT_S); send fewer or smaller images, or an archive "
                               "whose files can be read in name order") from None
            except BrokenProcessPool:
                raise ApiError(422, "check_crashed",
                               "the process checking this upload died (a file that crashes the decoder, "
                               "or out of memory); check the files decode locally") from None
            finally:  # a child that timed out, crashed or was abandoned is killed; only it
                self._give_back(child, healthy)

    async def warm(self) -> None:
        """Start every child (each imports torch once) so no check pays for it."""
        await asyncio.gather(*(self._call(checks.list_archs, timeout=120) for _ in range(self.s.validate_workers)))

    async def archs(self) -> list[str]:
        if self._archs is None:
            try:
                await self.warm()
                self._archs = await self._call(checks.list_archs, timeout=120)
            except ApiError as e:
                raise ApiError(503, "validator_unavailable", f"the validator did not start: {e.detail}") from None
        return self._archs

    async def check_job(self, **kwargs) -> dict:
        s = self.s
        res = await self._call(checks.check_job, limits=s.data_limits, sample=s.validate_sample, **kwargs)
        if not res["ok"]:
            raise ApiError(422, res["code"], res["message"], field=res["field"])
        return res


def _kill(child: ProcessPoolExecutor) -> None:
    for p in list(getattr(child, "_processes", {}).values()):
        p.kill()
    child.shutdown(wait=False, cancel_futures=True)


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
