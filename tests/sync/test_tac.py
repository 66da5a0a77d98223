"""The GSMA TAC file beside the lists: validated with TacDatabase, stored in Redis, switched."""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile

import redis

from eir_server.policy import TacDatabase
from eir_server.sync.command import add_sync_parser

HDR = "TAC|Manufacturer|Model_Name|Bands|Allocation_Date"
ROWS = [
    "35209900|Acme|Phone 1|GSM 900|01-Jan-2020",
    "35209901|Acme|Phone 2|LTE|02-Feb-2021",
    "86000000|Other|Thing|NR|03-Mar-2022",
]


def tac_text(rows: list[str]) -> bytes:
    return ("\r\n".join([HDR, *rows]) + "\r\n").encode()


def served(url: str) -> tuple[dict[str, str], bytes | None, set[str]]:
    c = redis.Redis.from_url(url, decode_responses=False)
    try:
        ptr = {k.decode(): v.decode() for k, v in c.hgetall("eir:tac").items()}
        text = c.get(f"eir:tac:{ptr['sha256']}") if ptr else None
        stored = {k.decode() for k in c.hkeys("eir:tacs")}
        return ptr, text, stored
    finally:
        c.close()


def test_tac_file_is_validated_stored_and_switched(redis_url, dirbs, sync_dir):
    dirbs.publish("blacklist", "20240101_000000", [["35000000000001", "20240101", "x"]])
    (dirbs.root / "gsma_tac_20240101.txt").write_bytes(tac_text(ROWS))
    r = sync_dir(redis_url, dirbs.root)
    assert r.mode == "full" and not r.refused and r.tac["switched"]
    ptr, text, stored = served(redis_url)
    sha = hashlib.sha256(tac_text(ROWS)).hexdigest()
    assert ptr["sha256"] == sha and ptr["file"] == "gsma_tac_20240101.txt" and ptr["rows"] == "3"
    assert text == tac_text(ROWS) and stored == {sha}
    db = TacDatabase.parse_gsma(text.decode().splitlines(), source="redis")
    assert len(db) == 3 and db.allocations["35209901"].manufacturer == "Acme"

    r = sync_dir(redis_url, dirbs.root)  # same file: nothing parsed, nothing written
    assert r.mode == "noop" and r.tac["unchanged"] and "switched" not in r.tac

    # A newer TAC file, published as a zip, replaces it; the old text is deleted.
    new_rows = [*ROWS, "35999999|New|Model|NR|04-Apr-2024"]
    with zipfile.ZipFile(dirbs.root / "gsma_tac_20240201.zip", "w") as zf:
        zf.writestr("gsma_tac_20240201.txt", tac_text(new_rows))
    r = sync_dir(redis_url, dirbs.root)
    assert r.mode == "noop" and r.tac["switched"] and r.tac["rows"] == 4
    ptr, text, stored = served(redis_url)
    assert ptr["file"] == "gsma_tac_20240201.zip" and text == tac_text(new_rows)
    assert stored == {ptr["sha256"]} and ptr["sha256"] != sha


def _cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="eir-server")
    add_sync_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(argv)
    return args.func(args)


def test_bad_tac_file_is_refused_and_the_lists_still_update(redis_url, dirbs, sync_dir):
    dirbs.publish(
        "blacklist", "20240101_000000", [["35000000000001", "20240101", "x"]], base=0, run=1
    )
    (dirbs.root / "gsma_tac_20240101.txt").write_bytes(tac_text(ROWS))
    sync_dir(redis_url, dirbs.root)
    before, before_text, _ = served(redis_url)

    dirbs.publish(
        "blacklist",
        "20240102_000000",
        [["35000000000001", "20240101", "x"], ["35000000000002", "20240101", "y"]],
        deltas={"blocked": [["35000000000002", "20240101", "y"]]},
        base=1,
        run=2,
    )
    bad = [*ROWS[:1], "1234|Short|TAC|x|y", "35209902|too|few"]  # 2 of 3 rows bad
    (dirbs.root / "gsma_tac_20240102.txt").write_bytes(tac_text(bad))
    base = ["sync", "--source", str(dirbs.root), "--store", redis_url, "--grace", "0"]
    assert _cli([*base, "--progress", "never"]) == 1
    ptr, text, stored = served(redis_url)
    assert ptr == before and text == before_text and stored == {before["sha256"]}
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    meta = c.hgetall(f"eir:{c.get('eir:cur')}:m")
    assert meta["count"] == "2"  # the blacklist moved on
    last = json.loads(c.lindex("eir:runs", 0))
    assert "2 of 3 rows are bad" in last["refused"]["gsma_tac"]
    assert last["gsma_tac"]["bad_lines"][0][0] == 3  # numbered from the header, line 1

    (dirbs.root / "gsma_tac_20240102.txt").write_bytes(b"")  # no header at all
    r = sync_dir(redis_url, dirbs.root)
    assert "empty file" in r.refused["gsma_tac"] and served(redis_url)[0] == before
