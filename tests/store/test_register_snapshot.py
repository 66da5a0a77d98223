"""The embedded register's node-shared snapshot (register_snapshot.py): the same records and
verdicts as the in-process dict for generated registers of every list kind, one file per
register contents, reloads that switch at once, builds that never leave a half file, and the
per-process load (logged once) when no snapshot can be had. Real builder processes, real files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from bisect import bisect_left
from pathlib import Path

import pytest
import structlog
import structlog.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eir_server.policy import PolicyConfig, load_policy
from eir_server.policy.types import CheckRequest
from eir_server.store import MemoryStore, memory
from eir_server.store.register import RegisterError
from eir_server.store.register_snapshot import (
    RegisterView,
    SnapshotUnavailable,
    ensure,
    file_name,
    register_key,
    resolve_dir,
)
from eir_server.store.snapshot import Snapshot

HEADERS = {
    "blacklist": "imei,block_date,reasons",
    "notifications": "imei,imsi,msisdn,block_date,reasons,amnesty_granted",
    "exceptions": "imei,imsi,msisdn",
}
# A small pool so that lists overlap on IMEIs; 15- and 16-digit forms name the same IMEI.
POOL = [f"3520990017{i:04d}" for i in range(0, 40)] + ["86000000000005", "00000000000001"]
IMSIS = ["001010123456789", "001010123456780", "31015", "310150000000004"]
DATES = ["20200101", "20200102", "20231231", "20240229", "20991231"]
REASONS = ["stolen", "lost|stolen", " lost | stolen ", "", "x||y", "counterfeit", "vol|perdu é"]

imei_text = st.sampled_from(POOL).flatmap(
    lambda i: st.sampled_from([i, i + "7", i + "01"]))
bad_field = st.sampled_from(["", "abc", "2020-01-01", "1" * 20])


@pytest.fixture(autouse=True)
def _mapped_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """These registers are small: without this, MemoryStore would copy them into a dict and
    the tests would compare a dict with a dict. Here every lookup reads the mapped file."""
    monkeypatch.setattr(memory, "SMALL_REGISTER", 0)


def _row(*fields: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*fields).map(list)


blacklist_row = st.one_of(
    _row(imei_text, st.sampled_from(DATES), st.sampled_from(REASONS)),
    _row(imei_text, bad_field, st.sampled_from(REASONS)),  # a bad row now and then
)
notification_row = _row(imei_text, st.sampled_from(IMSIS), st.sampled_from(["", "15551234567"]),
                        st.sampled_from(DATES), st.sampled_from(REASONS),
                        st.sampled_from(["True", "False", "", "yes", "0"]))
exception_row = _row(imei_text, st.sampled_from(IMSIS), st.sampled_from(["", "15550000000"]))


@st.composite
def registers(draw: st.DrawFn) -> dict[str, list[list[str]]]:
    """list name -> rows, for a blacklist and notification/exception lists of 1-2 operators."""
    out: dict[str, list[list[str]]] = {}
    if draw(st.booleans()):
        out["blacklist"] = draw(st.lists(blacklist_row, max_size=60))
    for op in draw(st.sets(st.sampled_from(["op1", "op2"]), max_size=2)):
        out[f"notifications_{op}"] = draw(st.lists(notification_row, max_size=15))
    for op in draw(st.sets(st.sampled_from(["op1", "op2"]), max_size=2)):
        out[f"exceptions_{op}"] = draw(st.lists(exception_row, max_size=15))
    return out


def write_register(root: Path, lists: dict[str, list[list[str]]], ts: str = "20260101_000000",
                   zipped: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in lists.items():
        text = "\n".join([HEADERS[name.split("_")[0]], *(",".join(r) for r in rows)]) + "\n"
        if zipped:
            with zipfile.ZipFile(root / f"{ts}_{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"{ts}_{name}.csv", text)
        else:
            (root / f"{ts}_{name}.csv").write_text(text)
    return root


POLICY = load_policy(PolicyConfig.from_mapping({"unknown_equipment": "whitelisted"}))


def assert_same(dict_store: MemoryStore, snap_store: MemoryStore) -> None:
    assert snap_store.snapshot_path is not None and dict_store.snapshot_path is None
    assert len(snap_store) == len(dict_store)
    assert snap_store.version == dict_store.version
    assert [r.as_dict() for r in snap_store.reports] == [r.as_dict() for r in dict_store.reports]
    for imei in [*POOL, "35209900179999", "99999999999999"]:
        want, got = dict_store.get_nowait(imei), snap_store.get_nowait(imei)
        assert got == want, imei
        for imsi in (None, *IMSIS):  # the verdicts too: pairing and notification rules
            req = CheckRequest(imei, imsi=imsi)
            assert (POLICY.decide(req, got, "20240601") == POLICY.decide(req, want, "20240601"))


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lists=registers(), zipped=st.booleans())
def test_snapshot_answers_as_the_dict_does(tmp_path_factory: pytest.TempPathFactory,
                                           lists: dict[str, list[list[str]]],
                                           zipped: bool) -> None:
    base = tmp_path_factory.mktemp("reg")
    reg = write_register(base / "register", lists, zipped=zipped)
    # An older generation of each list: the newest full list is what both serve.
    write_register(reg, {k: v[:1] for k, v in lists.items()}, ts="20250101_000000")
    plain = MemoryStore(max_bad_share=0.2)
    shared = MemoryStore(max_bad_share=0.2, snapshot_dir=base / "snap")
    try:
        plain.load_register_dir(reg)
    except RegisterError as e:  # refused: refused the same way, and nothing written
        with pytest.raises(RegisterError) as got:
            shared.load_register_dir(reg)
        assert str(got.value) == str(e)
        assert not list((base / "snap").glob("*.snap"))
        return
    shared.load_register_dir(reg)
    assert_same(plain, shared)


def test_blacklist_only_records_are_shared_objects(tmp_path: Path) -> None:
    reg = write_register(tmp_path / "reg", {"blacklist": [
        [POOL[0], "20200101", "stolen"], [POOL[1], "20200101", "stolen"],
        [POOL[2], "20200102", "stolen"]]})
    s = MemoryStore(snapshot_dir=tmp_path / "snap")
    s.load_register_dir(reg)
    a, b, c = (s.get_nowait(i) for i in POOL[:3])
    assert a is b and a is not c and a == b
    view = s._view
    assert view is not None  # and in the file, one entry per distinct value

    def value(imei: str) -> int:
        return int(view._vals[bisect_left(view._keys, int(imei))])

    assert value(POOL[0]) == value(POOL[1]) != value(POOL[2])


def test_one_file_per_register_contents_reused_rebuilt_and_cleaned(tmp_path: Path) -> None:
    reg = write_register(tmp_path / "reg", {"blacklist": [[POOL[0], "20200101", "stolen"]]})
    snap = tmp_path / "snap"
    first = ensure(reg, snap, 0.01)
    built = first.stat().st_mtime_ns
    # unchanged: the same file, not built again (a restart maps it at once)
    assert ensure(reg, snap, 0.01) == first and first.stat().st_mtime_ns == built
    # a newer list: a new file; the old one is deleted
    write_register(reg, {"blacklist": [[POOL[1], "20200101", "stolen"]]}, ts="20260102_000000")
    second = ensure(reg, snap, 0.01)
    assert second != first and not first.exists()
    assert sorted(p.name for p in snap.glob("*.snap")) == [second.name]
    # the same file rewritten in place is a change too (size, mtime)
    (reg / "20260102_000000_blacklist.csv").write_text(
        f"{HEADERS['blacklist']}\n{POOL[2]},20200101,stolen\n{POOL[3]},20200101,stolen\n")
    third = ensure(reg, snap, 0.01)
    assert third not in (first, second) and [p.name for p in snap.glob("*.snap")] == [third.name]
    # another register in the same directory is left alone while it exists, dropped once gone
    other = write_register(tmp_path / "other", {"blacklist": [[POOL[4], "20200101", "x"]]})
    theirs = ensure(other, snap, 0.01)
    write_register(reg, {"blacklist": [[POOL[5], "20200101", "stolen"]]}, ts="20260103_000000")
    ours = ensure(reg, snap, 0.01)
    assert theirs.exists()
    for p in other.iterdir():
        p.unlink()
    other.rmdir()
    write_register(reg, {"blacklist": [[POOL[6], "20200101", "stolen"]]}, ts="20260104_000000")
    ensure(reg, snap, 0.01)
    assert not theirs.exists() and not ours.exists()


def test_reload_switches_at_once_and_the_old_mapping_keeps_answering(tmp_path: Path) -> None:
    reg = write_register(tmp_path / "reg", {"blacklist": [[POOL[0], "20200101", "stolen"]]})
    s = MemoryStore(reg, snapshot_dir=tmp_path / "snap")
    s.load_register_dir(reg)
    old_view, old_get = s._view, s._lookup.get
    assert s.get_nowait(POOL[0]) is not None and s.get_nowait(POOL[1]) is None
    write_register(reg, {"blacklist": [[POOL[1], "20200101", "stolen"]]}, ts="20260102_000000")
    s.load_register_dir(reg)
    assert s.version == "20260102_000000" and s.snapshot_path != old_view.path
    assert s.get_nowait(POOL[0]) is None and s.get_nowait(POOL[1]) is not None
    # a lookup that started on the old register finishes on it (its file is unlinked, mapped)
    assert not old_view.path.exists() and old_get(POOL[0]) is not None
    # a refused register keeps the current one
    (reg / "20260103_000000_blacklist.csv").write_text("imei,block_date,reasons\n" +
                                                       "bad,row,x\n" * 10)
    with pytest.raises(RegisterError):
        s.load_register_dir(reg)
    assert s.version == "20260102_000000" and s.get_nowait(POOL[1]) is not None


def test_a_killed_build_leaves_no_half_file_and_the_next_build_cleans_up(tmp_path: Path) -> None:
    rows = [[f"35{i:012d}", "20200101", "stolen"] for i in range(300_000)]
    reg = write_register(tmp_path / "reg", {"blacklist": rows})
    snap = tmp_path / "snap"
    snap.mkdir(mode=0o700)
    key = register_key(reg, 0.01)
    out = snap / file_name(reg, key)
    for delay in (0.3, 1.0, 2.0):
        proc = subprocess.Popen(
            [sys.executable, "-m", "eir_server.store.register_snapshot", "--register", str(reg),
             "--out", str(out), "--key", key, "--max-bad-share", "0.01"])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # whenever it died: under the real name there is a whole file or nothing
        if out.exists():
            Snapshot(out).close()
            out.unlink()
    # a builder that died while writing left its temporary file: cut short, with a dead pid
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (snap / f"{out.name}.tmp{dead.pid}").write_bytes(b"EIRSNAP1 half")
    # and a file cut short under the real name (a power cut before its data reached the disk)
    out.write_bytes(b"EIRSNAP1" + b"\0" * 30)
    s = MemoryStore(reg, snapshot_dir=snap)
    s.load_register_dir(reg)  # refuses the short file, builds it again
    assert s.snapshot_path == out and len(s) == 300_000
    assert sorted(p.name for p in snap.iterdir()) == sorted([out.name, f"register-{out.name.split('-')[1]}.lock"])


def test_no_snapshot_directory_loads_in_process_and_says_so_once(tmp_path: Path) -> None:
    reg = write_register(tmp_path / "reg", {"blacklist": [[POOL[0], "20200101", "stolen"]]})
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # structlog's capture, not stdout: another test's logging set-up (sync's) may send the
    # lines elsewhere
    with structlog.testing.capture_logs() as logs:
        s = MemoryStore(reg, snapshot_dir=blocker / "snap")
        s.load_register_dir(reg)
        s.load_register_dir(reg)
    assert s.snapshot_path is None and s.get_nowait(POOL[0]) is not None
    said = [e for e in logs if "register snapshot unavailable" in e["event"]]
    assert len(said) == 1, logs
    assert os.listdir(reg) == ["20260101_000000_blacklist.csv"]  # the register dir untouched


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    reg = write_register(tmp_path / "reg", {"blacklist": [[POOL[0], "20200101", "stolen"]]})
    snap = tmp_path / "snap"
    snap.mkdir()
    snap.chmod(0o777)
    with pytest.raises(SnapshotUnavailable, match="writable by others"):
        ensure(reg, snap, 0.01)
    s = MemoryStore(reg, snapshot_dir=snap)
    s.load_register_dir(reg)
    assert s.snapshot_path is None and s.get_nowait(POOL[0]) is not None


def test_resolve_dir() -> None:
    assert resolve_dir("off") is None and resolve_dir(" OFF ") is None
    import tempfile
    assert resolve_dir("") == Path(tempfile.gettempdir()) / f"eir-register-{os.getuid()}"
    assert resolve_dir("/var/lib/eir") == Path(f"/var/lib/eir/eir-register-{os.getuid()}")


def test_an_empty_register_directory_is_an_empty_register(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    s = MemoryStore(reg, snapshot_dir=tmp_path / "snap")
    s.load_register_dir(reg)
    assert s.snapshot_path is not None and len(s) == 0 and s.version is None
    assert s.get_nowait(POOL[0]) is None
    view = RegisterView(s.snapshot_path)
    assert view.meta["imeis"] == 0
    view.close()


def test_many_imeis_every_one_and_its_neighbours(tmp_path: Path) -> None:
    # Enough keys for many index strides (register_snapshot.INDEX_STRIDE): every listed IMEI,
    # the ones next to it, and the first and last keys are answered as the dict answers them.
    import random

    rnd = random.Random(5)
    imeis = sorted({f"{rnd.randrange(10**13, 10**14):014d}" for _ in range(3000)}
                   | {"00000000000000", "99999999999999"})
    rows = [[i, rnd.choice(DATES), rnd.choice(REASONS)] for i in imeis]
    notes = [[i, IMSIS[0], "", DATES[0], "x", "True"] for i in imeis[::97]]
    reg = write_register(tmp_path / "reg", {"blacklist": rows, "notifications_op1": notes})
    plain, shared = MemoryStore(), MemoryStore(snapshot_dir=tmp_path / "snap")
    plain.load_register_dir(reg)
    shared.load_register_dir(reg)
    for i in imeis:
        n = int(i)
        for probe in {max(n - 1, 0), n, min(n + 1, 10**14 - 1)}:
            key = f"{probe:014d}"
            assert shared.get_nowait(key) == plain.get_nowait(key), key


def test_a_file_that_cannot_be_written_falls_back_to_the_process(tmp_path: Path) -> None:
    # A full disk, as a file size limit (EFBIG instead of ENOSPC: no filesystem to fill): the
    # builder gives up, leaves nothing behind, and the register is loaded in the process.
    rows = [[f"35{i:012d}", "20200101", "stolen"] for i in range(20_000)]
    reg = write_register(tmp_path / "reg", {"blacklist": rows})
    snap = tmp_path / "snap"
    code = f"""
import resource
from eir_server.store import MemoryStore
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
s = MemoryStore(snapshot_dir={str(snap)!r})
s.load_register_dir({str(reg)!r})
print("RESULT", s.snapshot_path, len(s), s.get_nowait("35000000000007") is not None)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, r.stderr
    assert "RESULT None 20000 True" in r.stdout, r.stdout
    assert r.stdout.count("register snapshot unavailable") == 1 and "snapshot not written" in r.stdout
    assert [p.name for p in snap.iterdir()] == [p.name for p in snap.glob("*.lock")]


def test_a_small_register_is_looked_up_in_a_dict_with_the_same_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "20260101_000000_blacklist.csv").write_text(
        "imei,block_date,reasons\n" + "".join(f"{35000000000000 + i * 7},20200101,stolen\n"
                                              for i in range(500)))
    mapped = MemoryStore(reg, snapshot_dir=tmp_path / "snap")
    mapped.load_register_dir(reg)
    monkeypatch.setattr(memory, "SMALL_REGISTER", 500)
    small = MemoryStore(reg, snapshot_dir=tmp_path / "snap")
    small.load_register_dir(reg)
    assert small.snapshot_path == mapped.snapshot_path  # one file, built once
    assert type(small._lookup.get.__self__) is dict  # type: ignore[attr-defined]
    assert type(mapped._lookup.get.__self__) is not dict  # type: ignore[attr-defined]
    for i in range(3600):
        imei = f"{35000000000000 + i:014d}"
        assert small.get_nowait(imei) == mapped.get_nowait(imei)
