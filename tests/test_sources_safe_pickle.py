"""The restricted unpickler: plain data loads (Python 2 files included), anything else is refused unrun."""

from __future__ import annotations

import collections
import os
import pickle
import pickletools

import pytest
from tests.py2pickle import python2_pickle

from perceptio.errors import PerceptioError
from perceptio.sources.safe_pickle import load_plain_pickle


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_os_system_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1}, _RunsCommand(f"touch {marker}")], protocol=protocol))
    with pytest.raises(PerceptioError) as caught:
        load_plain_pickle(path)
    assert str(path) in str(caught.value) and "system" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [_Evaluates(), collections.OrderedDict(a=1), pickle.PicklingError("x"), range(3)],
    ids=["eval", "class-instance", "exception", "range"],
)
def test_anything_needing_a_global_is_refused(tmp_path, payload):
    path = tmp_path / "evil.p"
    path.write_bytes(pickle.dumps({"refs": [payload]}, protocol=2))
    with pytest.raises(PerceptioError, match="refused to load"):
        load_plain_pickle(path)


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_plain_containers_and_scalars_load_in_every_protocol(tmp_path, protocol):
    value = {"ref_id": 7, "ok": True, "none": None, "area": 2.5, "sentences": [{"sent": "man left"}], "pair": (1, 2)}
    path = tmp_path / "plain.p"
    path.write_bytes(pickle.dumps(value, protocol=protocol))
    assert load_plain_pickle(path) == value


def test_python2_byte_strings_become_text(tmp_path):
    refs = [{b"ref_id": 3, b"split": b"testA", b"sentences": [{b"raw": "naïve".encode(), b"sent": "naïve"}]}]
    path = tmp_path / "refs(unc).p"
    path.write_bytes(python2_pickle(refs))
    opcodes = {opcode.name for opcode, _, _ in pickletools.genops(path.read_bytes())}
    assert "SHORT_BINSTRING" in opcodes and "GLOBAL" not in opcodes  # really the Python 2 form
    expected = [{"ref_id": 3, "split": "testA", "sentences": [{"raw": "naïve", "sent": "naïve"}]}]
    assert load_plain_pickle(path) == expected
    # A byte string that is not UTF-8 (Latin-1 "café") makes the file read as Latin-1.
    path.write_bytes(python2_pickle([{b"raw": b"caf\xe9", b"sent": "cafe"}]))
    assert load_plain_pickle(path) == [{"raw": "café", "sent": "cafe"}]


def test_python3_bytes_stay_bytes(tmp_path):
    path = tmp_path / "bytes.p"
    path.write_bytes(pickle.dumps({"blob": b"\x00\xff"}, protocol=4))
    assert load_plain_pickle(path) == {"blob": b"\x00\xff"}


def test_truncated_or_missing_pickle_is_a_one_line_error(tmp_path):
    path = tmp_path / "cut.p"
    path.write_bytes(pickle.dumps([{"ref_id": index} for index in range(50)], protocol=2)[:40])
    with pytest.raises(PerceptioError, match="not a readable pickle"):
        load_plain_pickle(path)
    with pytest.raises(PerceptioError, match="not found"):
        load_plain_pickle(tmp_path / "absent.p")


def test_persistent_references_are_refused(tmp_path):
    class _Outside(pickle.Pickler):
        def persistent_id(self, obj):
            return "database-row-1" if obj == "secret" else None

    path = tmp_path / "persistent.p"
    with open(path, "wb") as handle:
        _Outside(handle, protocol=2).dump(["secret"])
    with pytest.raises(PerceptioError, match="outside object"):
        load_plain_pickle(path)
