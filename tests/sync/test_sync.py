"""Sync from a directory into a real Redis: full, delta, gaps, idempotency, crashes, bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import zipfile
from pathlib import Path

import pytest
import redis
import structlog
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.policy.types import BlacklistEntry, ExceptionEntry, ImeiRecord, NotificationEntry
from eir_server.store import MemoryStore, open_store
from eir_server.store.register import RegisterError
from eir_server.sync.command import add_sync_parser, run_sync

HDR = {
    "blacklist": "imei,block_date,reasons",
    "notifications": "imei,imsi,msisdn,block_date,reasons,amnesty_granted",
    "exceptions": "imei,imsi,msisdn",
}
DELTA_REASONS = {  # list kind -> (added, removed, changed)
    "blacklist": ("blocked", "unblocked", "changed"),
    "notifications": ("new", "resolved", "changed"),
    "exceptions": ("added", "removed", "added"),
}


class Model:
    """What the register publishes; `publish` writes zips with full lists and exact deltas."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lists: dict[str, dict[tuple[str, ...], tuple[str, ...]]] = {}
        self.published: dict[str, tuple[dict, str]] = {}  # list -> (rows, run id)
        self.run = 0

    def set(self, list_name: str, rows: dict[tuple[str, ...], tuple[str, ...]]) -> None:
        self.lists[list_name] = dict(rows)

    def publish(self, ts: str, only: set[str] | None = None) -> None:
        self.run += 1
        for name, rows in self.lists.items():
            if only is not None and name not in only:
                continue
            kind = name.split("_")[0]
            prev, base = self.published.get(name, ({}, "-1"))
            add_r, rem_r, chg_r = DELTA_REASONS[kind]
            delta: dict[str, list[str]] = {add_r: [], rem_r: [], chg_r: []}
            for k, v in rows.items():
                if k not in prev:
                    delta[add_r].append(",".join(k + v))
                elif prev[k] != v:
                    delta[chg_r].append(",".join(k + v))
            for k, v in prev.items():
                if k not in rows:
                    delta[rem_r].append(",".join(k + v))
            path = self.root / f"{ts}_{name}.zip"
            with zipfile.ZipFile(path, "w") as zf:
                zf.writestr(
                    f"{ts}_{name}.csv",
                    "\n".join([HDR[kind]] + [",".join(k + v) for k, v in rows.items()]) + "\n",
                )
                for reason, lines in delta.items():
                    zf.writestr(
                        f"{ts}_{name}_delta_{base}_{self.run}_{reason}.csv",
                        "\n".join([HDR[kind], *lines]) + "\n",
                    )
            self.published[name] = (dict(rows), str(self.run))

    def expected(self) -> dict[str, ImeiRecord]:
        out: dict[str, dict] = {}
        for name, rows in sorted(self.lists.items()):
            kind, _, op = name.partition("_")
            for k, v in rows.items():
                e = out.setdefault(k[0][:14], {"b": None, "n": {}, "e": {}})
                if kind == "blacklist":
                    e["b"] = BlacklistEntry(v[0], tuple(r for r in v[1].split("|") if r))
                elif kind == "notifications":
                    e["n"][(op, k[1])] = NotificationEntry(
                        k[1], v[0], v[1], tuple(r for r in v[2].split("|") if r), v[3] == "True"
                    )
                else:
                    e["e"][(op, k[1])] = ExceptionEntry(k[1], v[0])
        return {
            imei: ImeiRecord(
                e["b"],
                tuple(e["n"][x] for x in sorted(e["n"])),
                tuple(e["e"][x] for x in sorted(e["e"])),
            )
            for imei, e in out.items()
        }


def bl(*imeis: str, date: str = "20240101", reasons: str = "stolen") -> dict:
    return {(i,): (date, reasons) for i in imeis}


async def read_all(url: str, imeis) -> dict[str, ImeiRecord | None]:
    s = open_store(url)
    await s.start()
    try:
        got = await asyncio.gather(*(s.fetch(i) for i in imeis))
        return dict(zip(imeis, got, strict=True))
    finally:
        await s.close()


async def check(url: str, model: Model, extra=()) -> None:
    exp = model.expected()
    imeis = sorted(set(exp) | set(extra))
    got = await read_all(url, imeis)
    assert {k: v for k, v in got.items() if v is not None} == exp


def keys(url: str) -> set[str]:
    c = redis.Redis.from_url(url)
    try:
        return {k.decode() for k in c.scan_iter(count=1000)}
    finally:
        c.close()


def cur_meta(url: str) -> dict:
    c = redis.Redis.from_url(url, decode_responses=True)
    try:
        ver = c.get("eir:cur")
        return {"version": ver, **c.hgetall(f"eir:{ver}:m")}
    finally:
        c.close()


@pytest.fixture
def model(tmp_path):
    return Model(tmp_path / "reg")


async def test_full_then_delta_then_noop(redis_url, model, sync_dir):
    model.set("blacklist", bl("35000000000001", "350000000000020", "3500000000000399"))
    model.set(
        "notifications_op1",
        {("35000000000001", "310150000000001"): ("1555", "20240102", "dup|x", "False")},
    )
    model.set("exceptions_op2", {("35000000000009", "310150000000002"): ("",)})
    model.publish("20240101_000000")
    r1 = sync_dir(redis_url, model.root)
    assert (r1.mode, r1.imeis) == ("full", 4)
    await check(redis_url, model)

    model.lists["blacklist"].pop(("350000000000020",))
    model.lists["blacklist"][("35000000000004",)] = ("20240105", "lost")
    model.lists["blacklist"][("35000000000001",)] = ("20240101", "stolen|found_again")
    model.lists["exceptions_op2"][("35000000000001", "310150000000003")] = ("1666",)
    model.publish("20240102_000000")
    r2 = sync_dir(redis_url, model.root)
    assert r2.mode == "delta" and r2.previous == r1.version
    assert r2.imeis == 4  # -1 (unblocked) +1 (blocked)
    await check(redis_url, model, extra=["35000000000002"])
    assert cur_meta(redis_url)["base"] == r1.version  # delta versions share the full load

    before = keys(redis_url)
    r3 = sync_dir(redis_url, model.root)
    assert r3.mode == "noop" and r3.version == r2.version
    assert keys(redis_url) == before
    runs = [json.loads(x) for x in redis.Redis.from_url(redis_url).lrange("eir:runs", 0, -1)]
    assert [r["mode"] for r in runs] == ["noop", "delta", "full"]
    assert runs[1]["lists"]["blacklist"]["run_id"] == "2" and runs[1]["duration_s"] >= 0


async def test_gap_in_delta_chain_triggers_full_load(redis_url, model, sync_dir):
    model.set("blacklist", bl("35000000000001"))
    model.publish("20240101_000000")
    sync_dir(redis_url, model.root)
    model.lists["blacklist"].update(bl("35000000000002"))
    model.publish("20240102_000000")
    (model.root / "20240102_000000_blacklist.zip").unlink()  # the run in between is lost
    model.lists["blacklist"].update(bl("35000000000003"))
    model.publish("20240103_000000")
    r = sync_dir(redis_url, model.root)
    assert r.mode == "full"
    await check(redis_url, model)


async def test_old_versions_are_deleted_after_switch(redis_url, model, sync_dir):
    model.set("blacklist", bl(*(f"3500000000{i:04d}" for i in range(500))))
    model.publish("20240101_000000")
    r1 = sync_dir(redis_url, model.root)
    model.lists["blacklist"].pop(("35000000000007",))
    model.publish("20240102_000000")
    sync_dir(redis_url, model.root, force_full=True)
    ks = keys(redis_url)
    assert not any(k.startswith(f"eir:{r1.version}:") for k in ks)
    c = redis.Redis.from_url(redis_url)
    assert set(c.hkeys("eir:versions")) == {c.get("eir:cur")}


@pytest.mark.parametrize(
    "stage", ["planned", "version-created", "buckets-partial", "written", "switched"]
)
async def test_crash_at_any_point_keeps_serving_and_rerun_completes(
    redis_url, model, sync_dir, stage
):
    model.set("blacklist", bl(*(f"3500000000{i:04d}" for i in range(3000))))
    model.publish("20240101_000000")
    r1 = sync_dir(redis_url, model.root)
    old_expected = model.expected()
    model.lists["blacklist"] = bl(*(f"3600000000{i:04d}" for i in range(3000)))
    model.publish("20240102_000000")

    class Crash(Exception):
        pass

    def boom(s: str) -> None:
        if s == stage:
            raise Crash(s)

    with pytest.raises(Crash):
        sync_dir(redis_url, model.root, force_full=True, checkpoint=boom, flush_rows=500)
    if stage != "switched":
        assert cur_meta(redis_url)["version"] == r1.version
        got = await read_all(redis_url, sorted(old_expected))
        assert got == old_expected
    r2 = sync_dir(redis_url, model.root, force_full=stage != "switched")
    await check(redis_url, model, extra=list(old_expected)[:50])
    # Nothing left behind: only the served version's keys and the bookkeeping keys.
    ver = cur_meta(redis_url)["version"]
    assert r2.version == ver
    assert {k for k in keys(redis_url) if not k.startswith(f"eir:{ver}:")} == {
        "eir:cur",
        "eir:seq",
        "eir:versions",
        "eir:runs",
        "eir:runs:count",
    }


async def test_bad_rows_are_counted_by_line_and_skipped(redis_url, dirbs, sync_dir):
    body = (
        "\ufeffimei,block_date,reasons\r\n"
        "35000000000001,20240101,stolen\r\n"
        "3500000000000X,20240101,stolen\r\n"  # line 3: bad IMEI
        "35000000000002,20241301,stolen\r\n"  # line 4: bad date
        "35000000000003,20240101\r\n"  # line 5: 2 columns
        '"35000000000004",20240101,"lost|stolen"\r\n'
        '35000000000005,20240101,"multi\r\nline"\r\n'
        "\r\n"
        "1234,20240101,x\r\n"  # line 10 (the quoted field above spans 7-8): too short
        "35000000000006,20240101,\r\n"
    )
    rows_ok = [f"3510000000{i:04d},20240101,stolen" for i in range(200)]
    body += "\r\n".join(rows_ok) + "\r\n"
    dirbs.publish("blacklist", "20240101_000000", raw_full=body.encode())
    r = sync_dir(redis_url, dirbs.root, max_bad_share=0.05)
    assert r.mode == "full" and r.imeis == 4 + 200 and r.bad_rows == 4
    bad = r.lists["blacklist"]["files"][0]["bad_lines"]
    assert [b[0] for b in bad] == [3, 4, 5, 10]
    got = await read_all(
        redis_url, ["35000000000001", "35000000000004", "35000000000005", "35000000000006"]
    )
    assert got["35000000000004"].blacklist == BlacklistEntry("20240101", ("lost", "stolen"))
    assert got["35000000000005"].blacklist == BlacklistEntry("20240101", ("multi\r\nline",))
    assert got["35000000000006"].blacklist == BlacklistEntry("20240101", ())


def test_bad_rows_are_logged_with_their_first_lines(redis_url, dirbs, sync_dir):
    """docs/sync.md: skipped rows are reported by line in the log, not only counted: the
    operator finds them in the file without the run record."""
    bad = [[f"35000000000X{i:02d}", "20240101", "x"] for i in range(25)]  # lines 2-26
    good = [[f"3510000000{i:04d}", "20240101", "stolen"] for i in range(3000)]
    dirbs.publish("blacklist", "20240101_000000", bad + good)  # 25 of 3025: under 1%
    dirbs.publish("exceptions_op1", "20240101_000000", [["35100000000001", "310150000000001", ""]])
    with structlog.testing.capture_logs() as logs:
        r = sync_dir(redis_url, dirbs.root)
    assert r.mode == "full" and r.bad_rows == 25 and not r.refused
    said = [e for e in logs if e["event"] == "bad rows skipped"]
    assert len(said) == 1, logs  # the file that had some; not the clean one
    w = said[0]
    assert w["log_level"] == "warning" and (w["bad"], w["rows"]) == (25, 3000), w
    assert w["source"] == "20240101_000000_blacklist.zip:20240101_000000_blacklist.csv", w
    assert w["first"] == [f"line {n}: bad IMEI" for n in range(2, 22)], w  # the first 20


async def test_too_many_bad_rows_refuses_file_and_keeps_version(redis_url, dirbs, sync_dir):
    dirbs.publish("blacklist", "20240101_000000", [["35000000000001", "20240101", "stolen"]])
    r1 = sync_dir(redis_url, dirbs.root)
    dirbs.publish(
        "blacklist",
        "20240102_000000",
        [["35000000000002", "20240101", "x"], ["bad", "20240101", "x"]],
    )
    r2 = sync_dir(redis_url, dirbs.root, max_bad_share=0.2)
    assert list(r2.refused) == ["blacklist"] and "1 of 2 rows are bad" in r2.refused["blacklist"]
    assert r2.mode == "noop" and cur_meta(redis_url)["version"] == r1.version
    got = await read_all(redis_url, ["35000000000001", "35000000000002"])
    assert got["35000000000001"] is not None and got["35000000000002"] is None
    last = json.loads(redis.Redis.from_url(redis_url).lindex("eir:runs", 0))
    assert last["mode"] == "noop" and "rows are bad" in last["error"]
    assert "line 3: bad IMEI" in last["refused"]["blacklist"]


def test_truncated_zip_and_bad_checksum_are_refused(redis_url, dirbs, sync_dir):
    p = dirbs.publish(
        "blacklist",
        "20240101_000000",
        [[f"3500000000{i:04d}", "20240101", "x"] for i in range(2000)],
    )
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    r = sync_dir(redis_url, dirbs.root)
    assert r.mode == "noop" and re.search("truncated|unreadable", r.refused["blacklist"])
    assert not redis.Redis.from_url(redis_url).exists("eir:cur")  # no empty version served
    p.write_bytes(data)
    (dirbs.root / (p.name + ".sha256")).write_text("0" * 64 + "  " + p.name + "\n")
    r = sync_dir(redis_url, dirbs.root)
    assert "sha256 mismatch" in r.refused["blacklist"]
    dirbs.publish(
        "blacklist", "20240101_000000", [["35000000000001", "20240101", "x"]], checksum="sha256"
    )
    r = sync_dir(redis_url, dirbs.root)
    assert r.mode == "full" and not r.refused


def test_corrupt_member_crc_is_refused(redis_url, dirbs, sync_dir):
    p = dirbs.publish(
        "blacklist", "20240101_000000", [[f"3500000000{i:04d}", "20240101", "x"] for i in range(50)]
    )
    zipfile.ZipFile(p).close()
    raw = bytearray(p.read_bytes())
    # Flip a byte of stored data (after the 30-byte local header and the member name).
    off = 30 + len("20240101_000000_blacklist.csv") + 40
    raw[off] ^= 0xFF
    p.write_bytes(bytes(raw))
    r = sync_dir(redis_url, dirbs.root)
    assert "corrupt data" in r.refused["blacklist"] or "Bad CRC" in r.refused["blacklist"]
    assert not redis.Redis.from_url(redis_url).exists("eir:cur")


async def test_refused_list_keeps_its_version_while_the_others_update(redis_url, model, sync_dir):
    model.set("blacklist", bl("35000000000001", "35000000000002"))
    model.set(
        "notifications_op1",
        {("35000000000003", "310150000000001"): ("", "20240102", "dup", "False")},
    )
    model.set("exceptions_op2", {("35000000000001", "310150000000002"): ("",)})
    model.publish("20240101_000000")
    r1 = sync_dir(redis_url, model.root)
    served_notifications = model.published["notifications_op1"][0]

    # Run 2: blacklist and exceptions change (deltas), the notifications file is corrupt.
    model.lists["blacklist"].update(bl("35000000000004"))
    model.lists["exceptions_op2"][("35000000000004", "310150000000009")] = ("",)
    model.lists["notifications_op1"][("35000000000005", "310150000000001")] = (
        "", "20240103", "new", "False",
    )  # fmt: skip
    model.publish("20240102_000000")
    bad = model.root / "20240102_000000_notifications_op1.zip"
    bad.write_bytes(bad.read_bytes()[:40])
    r2 = sync_dir(redis_url, model.root)
    assert r2.mode == "delta" and list(r2.refused) == ["notifications_op1"]
    assert r2.version != r1.version
    meta = json.loads(cur_meta(redis_url)["lists"])
    assert meta["notifications_op1"]["file"] == "20240101_000000_notifications_op1.zip"
    assert meta["blacklist"]["file"] == "20240102_000000_blacklist.zip"
    served = Model(model.root)
    served.lists = {k: v[0] for k, v in model.published.items()}
    served.lists["notifications_op1"] = served_notifications
    await check(redis_url, served, extra=["35000000000005"])

    # Run 3 needs a full load (forced); the blacklist's new file now has too many bad rows:
    # its rows were streamed into the new version before the count was known, so the load is
    # redone from the served blacklist file; the exceptions still move on.
    model.lists["blacklist"] = bl("36000000000001")
    model.lists["exceptions_op2"] = {("35000000000002", "310150000000002"): ("",)}
    model.publish("20240103_000000", only={"blacklist", "exceptions_op2"})
    with zipfile.ZipFile(model.root / "20240103_000000_blacklist.zip", "w") as zf:
        zf.writestr(
            "20240103_000000_blacklist.csv",
            "imei,block_date,reasons\n36000000000001,20240101,x\nnope,20240101,x\n",
        )
    r3 = sync_dir(redis_url, model.root, force_full=True, allow_shrink=True)
    assert r3.mode == "full" and sorted(r3.refused) == ["blacklist", "notifications_op1"]
    meta = json.loads(cur_meta(redis_url)["lists"])
    assert meta["blacklist"]["file"] == "20240102_000000_blacklist.zip"
    assert meta["exceptions_op2"]["file"] == "20240103_000000_exceptions_op2.zip"
    served.lists["blacklist"] = bl("35000000000001", "35000000000002", "35000000000004")
    served.lists["exceptions_op2"] = model.lists["exceptions_op2"]
    await check(redis_url, served, extra=["36000000000001"])
    # Only the switched version's keys remain (the redone load's partial buckets are gone).
    ver = cur_meta(redis_url)["version"]
    assert all(
        k.startswith(f"eir:{ver}:") or k in ("eir:cur", "eir:seq", "eir:versions", "eir:runs",
                                                "eir:runs:count")
        for k in keys(redis_url)
    )


def test_refusal_is_whole_when_the_served_file_is_gone(redis_url, model, sync_dir):
    model.set("blacklist", bl("35000000000001"))
    model.set("exceptions_op2", {("35000000000001", "310150000000002"): ("",)})
    model.publish("20240101_000000")
    r1 = sync_dir(redis_url, model.root)
    model.lists["exceptions_op2"] = {}
    model.publish("20240102_000000")
    (model.root / "20240101_000000_blacklist.zip").unlink()
    b2 = model.root / "20240102_000000_blacklist.zip"
    b2.write_bytes(b2.read_bytes()[:30])
    with pytest.raises(RegisterError, match="served file 20240101_000000_blacklist.zip"):
        sync_dir(redis_url, model.root, force_full=True)
    assert cur_meta(redis_url)["version"] == r1.version


def test_list_no_longer_published_is_refused_unless_allowed(redis_url, model, sync_dir):
    model.set("blacklist", bl("35000000000001"))
    model.set("exceptions_op1", {("35000000000001", "310150000000001"): ("",)})
    model.publish("20240101_000000")
    sync_dir(redis_url, model.root)
    (model.root / "20240101_000000_exceptions_op1.zip").unlink()
    with pytest.raises(RegisterError, match="no longer published"):
        sync_dir(redis_url, model.root)
    assert sync_dir(redis_url, model.root, allow_missing_lists=True).mode == "full"


def test_memory_store_loads_the_same_register(model):
    model.set("blacklist", bl("35000000000001", "35000000000002", reasons="a|b"))
    model.set(
        "notifications_op1",
        {("35000000000002", "310150000000001"): ("", "20240102", "dup", "True")},
    )
    model.publish("20240101_000000")
    model.lists["blacklist"].pop(("35000000000001",))
    model.publish("20240102_000000")
    s = MemoryStore()
    s.load_register_dir(model.root)
    assert {i: s.get_nowait(i) for i in model.expected()} == model.expected()
    assert s.get_nowait("35000000000001") is None and s.version == "20240102_000000"


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="eir-server")
    add_sync_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


def test_cli_exit_codes(redis_url, model):
    model.set("blacklist", bl("35000000000001"))
    model.publish("20240101_000000")
    base = [
        "sync",
        "--source",
        str(model.root),
        "--store",
        redis_url,
        "--grace",
        "0",
        "--progress",
        "never",
    ]
    assert _cli(base + ["--once"]) == 0
    assert cur_meta(redis_url)["count"] == "1"
    assert _cli(["sync", "--source", str(model.root), "--store", "memory://"]) == 2
    (model.root / "20240102_000000_blacklist.zip").write_bytes(b"PK\x03\x04 truncated")
    assert _cli(base) == 1
    assert _cli(["sync", "--source", str(model.root / "nope"), "--store", redis_url]) == 4
    assert _cli(["sync", "--source", str(model.root), "--store", "redis://127.0.0.1:1/0"]) == 3
    assert run_sync is not None


def test_cli_exit_code_when_no_register_exists_anywhere(redis_url, tmp_path):
    """An empty source (wrong path, a mirror not filled yet) into a store holding no register:
    nothing is served, so not "nothing to do" (0) but EXIT_SOURCE (4) with an error line."""
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["sync", "--source", str(empty), "--store", redis_url, "--once", "--grace", "0",
            "--progress", "never"]
    with structlog.testing.capture_logs() as logs:
        assert _cli(argv) == 4
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1 and "publishes no register files" in errors[0]["event"], logs
    assert errors[0]["source"] == str(empty), errors
    assert not redis.Redis.from_url(redis_url).exists("eir:cur")


def test_cli_counts_a_refused_run_once(redis_url, dirbs):
    """eir_sync_runs_total: one run, one count. A run that refused a list is `refused`, not
    also its mode (`noop` here): the rate of runs is the sum over results."""
    from prometheus_client import REGISTRY

    def runs() -> dict[str, float]:
        return {s.labels["result"]: s.value for m in REGISTRY.collect()
                if m.name == "eir_sync_runs" for s in m.samples if s.name.endswith("_total")}

    dirbs.publish("blacklist", "20240101_000000", [["35000000000001", "20240101", "stolen"]])
    base = ["sync", "--source", str(dirbs.root), "--store", redis_url, "--once", "--grace", "0",
            "--progress", "never"]
    assert _cli(base) == 0
    dirbs.publish("blacklist", "20240102_000000",
                  [["35000000000002", "20240101", "x"], ["bad", "20240101", "x"]])
    before = runs()
    assert _cli(base) == 1  # the new blacklist refused, the old one serves: a noop run
    after = runs()
    grew = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert grew == {"refused": 1.0}, grew


# -- property: any sequence of publications, fed run by run, serves exactly the latest lists --

imeis = st.sampled_from([f"35{i:012d}" for i in range(12)] + ["86000000000001", "01234567890123"])
bl_rows = st.dictionaries(
    st.tuples(imeis),
    st.tuples(
        st.sampled_from(["20240101", "20231231"]), st.sampled_from(["stolen", "lost|stolen", ""])
    ),
    max_size=8,
)
notif_rows = st.dictionaries(
    st.tuples(imeis, st.sampled_from(["310150000000001", "310150000000002"])),
    st.tuples(
        st.sampled_from(["", "1555"]),
        st.just("20240101"),
        st.sampled_from(["dup", "a|b"]),
        st.sampled_from(["True", "False"]),
    ),
    max_size=5,
)
exc_rows = st.dictionaries(
    st.tuples(imeis, st.sampled_from(["310150000000001", "310150000000003"])),
    st.tuples(st.sampled_from(["", "1777"])),
    max_size=4,
)
steps = st.lists(
    st.tuples(bl_rows, notif_rows, exc_rows, st.booleans(), st.booleans()), min_size=1, max_size=4
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=steps)
def test_property_any_publication_sequence_serves_latest_lists(
    redis_server, sync_dir, tmp_path_factory, steps
):
    url = redis_server.url
    redis.Redis.from_url(url).flushall()
    model = Model(tmp_path_factory.mktemp("prop"))
    for n, (b, no, ex, skip_notif, lose_run) in enumerate(steps):
        model.set("blacklist", b)
        model.set("notifications_op1", no)
        model.set("exceptions_op2", ex)
        ts = f"202401{n + 1:02d}_000000"
        model.publish(ts, only=None if not skip_notif else {"blacklist", "exceptions_op2"})
        if lose_run and n:  # a run the sync never sees: forces the gap handling
            continue
        sync_dir(url, model.root, allow_shrink=True)  # lists may shrink, even to nothing
        # Published state, not model state, is what must be served.
        served = Model(model.root)
        served.lists = {k: v[0] for k, v in model.published.items()}
        asyncio.run(check(url, served, extra=[f"35{i:012d}" for i in range(12)]))
