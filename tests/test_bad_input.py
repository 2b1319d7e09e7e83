"""Hostile and random input through the CLI: accepted and round-tripped, or refused
cleanly with the promised message; never a crash, never a file outside the dirs (issue 6).

The CLI's ``main()`` runs in-process here (the same code path as the command, minus
a Python start per example) so hypothesis can try many names.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import Env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfs.cli import main

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def run(env: Env, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*env.dir_args, *args])
    out, err = capsys.readouterr()
    return code, out, err


def outside_state(env: Env) -> set[str]:
    """Every path under the test's root except the state and run dirs."""
    return {str(p.relative_to(env.root)) for p in env.root.rglob("*")
            if env.state not in (p, *p.parents) and env.run not in (p, *p.parents)}


def expected_refusal(name: str) -> str | None:
    """The message snapfs must give for ``name``, or None if it must be accepted."""
    raw = name.encode("utf-8", "surrogateescape")
    if not name:
        return "empty"
    if len(raw) > 64:
        return "bytes long"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if name.startswith("."):
        return "starts with '.'"
    if "/" in name or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return "control character"
    return None


names = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=70),
    st.binary(max_size=70).filter(lambda b: b"\x00" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["..", "../../etc/passwd", "a/b", "-n", "--help", "x" * 64, "é" * 32,
                     "é" * 33, "1", "snapshotdata-x.xl", ".undo", ".undo.next", "\u200b",
                     "a\u0085b", "\ufeffbom"]),
)


@pytest.fixture(scope="module")
def shut_off(module_env: Env) -> Env:
    module_env.define("names")
    return module_env


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names)
def test_snapshot_names_round_trip_or_are_refused(shut_off: Env, capsys: pytest.CaptureFixture[str],
                                                  name: str) -> None:
    before = outside_state(shut_off)
    code, out, err = run(shut_off, capsys, "vm-snapshot-create", f"--name={name}", "names")
    refusal = expected_refusal(name)
    assert "Traceback" not in err
    if refusal is not None:
        assert code == 1 and refusal in err, (name, code, err)
        assert outside_state(shut_off) == before
        return
    assert code == 0, (name, err)
    code, out, err = run(shut_off, capsys, "vm-snapshot-list", "--json", "names")
    assert name in [s["name"] for s in json.loads(out)]
    code, out, err = run(shut_off, capsys, "disk-snapshot-list", "--json", "names")
    assert name in [s["tag"] for s in json.loads(out)]
    code, _, err = run(shut_off, capsys, "vm-snapshot-delete", f"--name={name}", "names")
    assert code == 0, err
    assert outside_state(shut_off) == before, "only the state and run dirs change"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=80).filter(lambda s: "\x00" not in s))
def test_domain_names_are_checked(env: Env, capsys: pytest.CaptureFixture[str], name: str) -> None:
    disk = env.images / "x.qcow2"
    if not disk.exists():
        env.disk("x", "vda", boot=False)
        os.replace(env.images / "x-vda.qcow2", disk)
    toml = env.root / "hostile.toml"
    quoted = json.dumps(name, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML wants it escaped
    toml.write_text(f"name = {quoted}\nmemory = \"32M\"\n"
                    f"[[disks]]\ndev = \"vda\"\nfile = \"{disk}\"\n")
    code, out, err = run(env, capsys, "domain", "define", str(toml))
    assert "Traceback" not in err
    if NAME_RE.fullmatch(name) and not (env.config / "domains" / f"{name}.toml").exists():
        assert code == 0, err
        assert (env.config / "domains" / f"{name}.toml").is_file()
    elif not NAME_RE.fullmatch(name):
        assert code == 1 and "'name'" in err, err
    assert all(p.parent == env.config / "domains" for p in env.config.rglob("*") if p.is_file())


@pytest.mark.parametrize("text, message", [
    ('name = "h"\nmemory = "99999999999G"\n[[disks]]\ndev = "vda"\nfile = "/x"\n', "memory"),
    ('name = "h"\nmemory = "32M"\ncpus = 100000\n[[disks]]\ndev = "vda"\nfile = "/x"\n', "cpus"),
    ('name = "h"\nmemory = "32M"\ncpus = true\n[[disks]]\ndev = "vda"\nfile = "/x"\n', "cpus"),
    ('name = "h"\nmemory = "32M"\ndisks = "vda"\n', "disks"),
    ('name = "h"\nmemory = "32M"\n[[disks]]\ndev = "../x"\nfile = "/x"\n', "dev"),
    ('name = "h"\nmemory = "32M"\n[[disks]]\ndev = "vda"\nfile = "rel/x"\n', "absolute"),
    ('name = "h"\nmemory = "32M"\nextra_args = [1, 2]\n[[disks]]\ndev = "vda"\nfile = "/x"\n',
     "extra_args"),
    ('name = "h"\nmemory = "32M"\nbackdoor = 1\n[[disks]]\ndev = "vda"\nfile = "/x"\n',
     "unknown key 'backdoor'"),
    ('name = "h"\nmemory = "32M"\naccel = "xen"\n[[disks]]\ndev = "vda"\nfile = "/x"\n', "accel"),
    ('name = "h"\nmemory = "32M"\nmachine = "q35,accel=tcg"\n[[disks]]\ndev = "vda"\nfile = "/x"\n',
     "machine"),
    ('name = "h"\nmemory = "32M"\n[[disks]]\ndev = "vda"\nfile = "/x"\n[[disks]]\ndev = "vda"\n'
     'file = "/y"\n', "share the dev name"),
    ("\xff\xfe garbage", "TOML"),
    ("name = " + '"' + "a" * 5000 + '"\n', "'name'"),
])
def test_hostile_definitions_are_refused(env: Env, capsys: pytest.CaptureFixture[str],
                                         text: str, message: str) -> None:
    toml = env.root / "hostile.toml"
    toml.write_text(text)
    code, _, err = run(env, capsys, "domain", "define", str(toml))
    assert code == 1 and message in err, err
    assert "Traceback" not in err
    assert not list((env.config / "domains").glob("*")) if (env.config / "domains").exists() else True


def test_malformed_info_files_are_listed_as_damaged_and_refused(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.define("infos")
    assert run(env, capsys, "vm-snapshot-create", "-n", "good", "infos")[0] == 0
    store = next((env.state / "snapshots").iterdir())
    (store / "snapshotdata-trunc.xl").write_text('snapshot_name="trunc"\nsnapshot_creat')
    (store / "snapshotdata-huge.xl").write_text('snapshot_name="huge"\n' + "x" * (1 << 17))
    (store / "snapshotdata-wrong.xl").write_text(
        'snapshot_name="other"\nsnapshot_creationtime="1"\n')
    (store / "snapshotdata-type.xl").write_text(
        'snapshot_name="type"\nsnapshot_creationtime="yesterday"\n')
    code, out, err = run(env, capsys, "vm-snapshot-list", "--json", "infos")
    listed = {s["name"]: s["state"] for s in json.loads(out)}
    assert code == 0 and listed == {"good": "shutoff", "trunc": "damaged", "huge": "damaged",
                                    "wrong": "damaged", "type": "damaged"}, listed
    for name in ("trunc", "huge", "wrong", "type"):
        code, _, err = run(env, capsys, "vm-snapshot-apply", "-n", name, "infos")
        assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
