"""Random and hostile snapshot names through the mounted tree (issue 6).

Each name given to ``mkdir`` is either accepted — listed by ``ls``, its files
readable, removed by ``rmdir`` — or refused with the errno docs/design.md promises; the
mount's log holds no unexpected error afterwards.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest
from conftest import Env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bad_input import expected_refusal
from test_tree_mount import Tree, assert_clean_log, mounted

ERRNO = {"empty": errno.EINVAL, "bytes long": errno.ENAMETOOLONG, "not UTF-8": errno.EINVAL,
         "starts with '.'": errno.EINVAL, "control character": errno.EINVAL}

raw_names = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.text(min_size=1, max_size=100).map(lambda s: s.encode()),
    st.sampled_from([b"x" * 64, b"x" * 65, "é".encode() * 32, "é".encode() * 33, b"-n", b"..a",
                     b".hidden", b"a\tb", b"\xff\xfe", b"snapshotdata-x.xl", b"x" * 255,
                     b"x" * 256, b"\xe2\x80\x8b"]),
).filter(lambda b: b"\x00" not in b and b"/" not in b and b not in (b".", b".."))


@pytest.fixture(scope="module")
def names_tree(module_env: Env) -> Iterator[Tree]:
    module_env.define("names")
    with mounted(module_env, name="names") as tree:
        yield tree
    assert_clean_log(tree.log)


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=raw_names)
def test_mkdir_names_round_trip_or_get_the_promised_errno(names_tree: Tree, name: bytes) -> None:
    domain = os.fsencode(names_tree / "names")
    path = domain + b"/" + name
    refusal = expected_refusal(name.decode("utf-8", "surrogateescape"))
    try:
        os.mkdir(path)
    except OSError as err:
        assert refusal is not None, (name, err)
        # The kernel itself refuses names over 255 bytes before asking snapfs.
        assert err.errno == ERRNO[refusal], (name, err, refusal)
        assert name not in os.listdir(domain)
        return
    assert refusal is None, (name, refusal)
    assert name in os.listdir(domain)
    info = open(path + b"/snapshotdata.xl", "rb").read()
    assert info.startswith(b'snapshot_name="')
    os.rmdir(path)
    assert name not in os.listdir(domain)
