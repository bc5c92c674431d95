"""preprocess.ffl4mia: safe loading of the official FFL4MIA split files."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from preprocess.ffl4mia import (
    PartitionFileError,
    UnsafePickleError,
    load_official_split,
    load_partition_file,
    load_split_csv,
    main,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ffl4mia"
ICH = DATA / "ICH_20"
needs_data = pytest.mark.skipif(
    not ICH.is_dir(), reason=f"official FFL4MIA files not found at {ICH} (../shared beside the checkout)"
)

SIZES_C4 = [1469, 854, 1063, 300, 1019, 464, 1145, 1056, 543, 438,
            1101, 831, 1428, 1727, 744, 1817, 1337, 735, 760, 1167]
SIZES_C2 = [1464, 889, 986, 319, 1085, 440, 1145, 1050, 536, 456,
            1171, 823, 1390, 1757, 775, 1782, 1215, 715, 902, 1098]


def npy_with_payload(path: Path, payload: bytes) -> Path:
    """Write a .npy file with an object-array header (like the official files) and a raw payload."""
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()}
        )
        f.write(payload)
    return path


# --- the real files ---------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("c, sizes", [(4, SIZES_C4), (2, SIZES_C2)])
def test_load_real_partition_file(c, sizes):
    parts = load_partition_file(ICH / f"dict_users_noniid_dir1.0_CorruptedNum{c}.npy")
    assert list(parts) == list(range(20))
    assert all(v.dtype == np.int64 and v.ndim == 1 for v in parts.values())
    assert [len(v) for v in parts.values()] == sizes
    rows = np.sort(np.concatenate(list(parts.values())))
    assert np.array_equal(rows, np.arange(19998))
    # The file's (unsorted) order is kept.
    if c == 4:
        assert parts[0][:3].tolist() == [16387, 8196, 16388]


@needs_data
def test_load_real_csvs():
    ids, labels = load_split_csv(ICH / "train.csv")
    assert len(ids) == 19998 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [438, 4101, 2597, 4291, 8571]
    assert ids[0].startswith("ID_") and np.all(np.diff(labels) >= 0)  # sorted by class
    test_ids, test_labels = load_split_csv(ICH / "test.csv")
    assert len(test_ids) == 5002
    assert np.bincount(test_labels).tolist() == [110, 1026, 650, 1073, 2143]


@needs_data
@pytest.mark.parametrize("c, sizes", [(4, SIZES_C4), (2, SIZES_C2)])
def test_load_official_split(c, sizes):
    train_ids, train_labels, test_ids, test_labels, parts = load_official_split(ICH, c)
    assert len(train_ids) == len(train_labels) == 19998
    assert len(test_ids) == len(test_labels) == 5002
    assert [len(p) for p in parts] == sizes


@needs_data
def test_main_prints_table(capsys):
    assert main([str(ICH), "--corrupted", "4", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "reproduced exactly" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:22]}
    assert lines["0"] == ["1469", "15", "179", "621", "113", "541"]
    assert lines["19*"] == ["1167", "32", "277", "2", "302", "554"]


# --- refusing tampered files -------------------------------------------------------------------


class _RunsShell:
    """Unpickling this object would run a shell command (pickle stores os.system by reference)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_refuses_os_system_and_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    # Hidden inside a dict shaped like the real payload; protocol 3 like the official files.
    payload = pickle.dumps({0: [np.int64(1)], 1: _RunsShell(f"touch {marker}")}, protocol=3)
    path = npy_with_payload(tmp_path / "evil.npy", payload)
    with pytest.raises(UnsafePickleError) as err:
        load_partition_file(path)
    msg = str(err.value)
    assert str(path) in msg and os.system.__module__ + ".system" in msg  # posix.system on Linux
    assert not marker.exists()


def test_refuses_handwritten_os_system(tmp_path):
    marker = tmp_path / "pwned"
    # Protocol-0 opcodes: GLOBAL 'os system', MARK, UNICODE arg, TUPLE, REDUCE, STOP.
    payload = b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    path = npy_with_payload(tmp_path / "evil.npy", payload)
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        load_partition_file(path)
    assert not marker.exists()
    assert isinstance(UnsafePickleError("x"), ValueError)


def test_refuses_builtins_eval(tmp_path):
    payload = b"\x80\x03cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    path = npy_with_payload(tmp_path / "eval.npy", payload)
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_partition_file(path)


def test_refuses_numpy_global_outside_allowlist(tmp_path):
    # numpy.load would itself be a way to reach allow_pickle=True: not admitted.
    payload = b"\x80\x03cnumpy\nload\nX\x01\x00\x00\x00x\x85R."
    with pytest.raises(UnsafePickleError, match=r"numpy\.load"):
        load_partition_file(npy_with_payload(tmp_path / "np.npy", payload))


# --- malformed files ---------------------------------------------------------------------------


def test_round_trip_file_written_by_current_numpy(tmp_path):
    path = tmp_path / "ok.npy"
    np.save(path, {1: [np.int64(5), 3], 0: np.array([2, 0]), 2: []}, allow_pickle=True)
    parts = load_partition_file(path)
    assert list(parts) == [0, 1, 2]
    assert parts[1].tolist() == [5, 3] and parts[0].tolist() == [2, 0] and parts[2].size == 0
    assert all(v.dtype == np.int64 for v in parts.values())


@needs_data
@pytest.mark.parametrize("keep", [0, 5, 60, 200, 300_000, 619_813])
def test_truncated_file_gives_clear_error(tmp_path, keep):
    data = (ICH / "dict_users_noniid_dir1.0_CorruptedNum4.npy").read_bytes()
    path = tmp_path / "cut.npy"
    path.write_bytes(data[:keep])
    with pytest.raises(PartitionFileError, match="truncated") as err:
        load_partition_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ({0: [np.int64(-1)]}, "negative"),
        ({0: [1.5]}, "ints"),
        ({0: [True]}, "ints"),
        ({-1: [0]}, "client ids"),
        ({"a": [0]}, "client ids"),
        ({0: "012"}, "list of row indices"),
        ({0: np.array([0.5])}, "integer array"),
        ([0, 1], "dict"),
    ],
)
def test_bad_contents_refused(tmp_path, content, match):
    path = tmp_path / "bad.npy"
    np.save(path, np.array(content, dtype=object) if isinstance(content, list) else content,
            allow_pickle=True)
    with pytest.raises(PartitionFileError, match=match):
        load_partition_file(path)


def test_plain_numeric_npy_refused(tmp_path):
    path = tmp_path / "plain.npy"
    np.save(path, np.arange(4))
    with pytest.raises(PartitionFileError, match="pickled dict"):
        load_partition_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(PartitionFileError, match="cannot read"):
        load_partition_file(tmp_path / "nope.npy")


# --- CSV loader and split checks on a small synthetic folder ----------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("id,label\nA,0\n", "line 1: expected header"),
        ("", "line 1: expected header"),
        ("id,class\nA,0\nB,x\n", "line 3: class 'x' is not an integer"),
        ("id,class\nA,0\nB,1,2\n", "line 3: expected 2 fields"),
        ("id,class\nA,0\n,1\n", "line 3: empty id"),
        ("id,class\nA,-2\n", "line 2: negative class"),
    ],
)
def test_csv_malformed_rows(tmp_path, text, match):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_split_csv(path)
    assert str(path) in str(err.value)


def test_csv_skips_blank_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,class\nA,0\n\nB,1\n")
    assert load_split_csv(path)[0] == ["A", "B"]


def make_folder(tmp_path, parts, train=("A", "B", "C", "D"), test=("E",)):
    (tmp_path / "train.csv").write_text("id,class\n" + "".join(f"{i},{n % 2}\n" for n, i in enumerate(train)))
    (tmp_path / "test.csv").write_text("id,class\n" + "".join(f"{i},0\n" for i in test))
    np.save(tmp_path / "dict_users_noniid_dir1.0_CorruptedNum1.npy", parts, allow_pickle=True)
    return tmp_path


def test_official_split_checks_exact_cover(tmp_path):
    folder = make_folder(tmp_path, {0: [0, 2], 1: [3, 1]})
    *_, parts = load_official_split(folder, 1)
    assert [p.tolist() for p in parts] == [[0, 2], [3, 1]]

    make_folder(tmp_path, {0: [0, 2], 1: [1]})
    with pytest.raises(PartitionFileError, match=r"exactly one client; 1 rows in none \(first: \[3\]\)"):
        load_official_split(folder, 1)
    make_folder(tmp_path, {0: [0, 2, 3], 1: [1, 2]})
    with pytest.raises(PartitionFileError, match="more than once"):
        load_official_split(folder, 1)
    make_folder(tmp_path, {0: [0, 2, 3], 1: [1, 4]})
    with pytest.raises(PartitionFileError, match="out of range"):
        load_official_split(folder, 1)
    make_folder(tmp_path, {0: [0, 1, 2], 2: [3]})
    with pytest.raises(PartitionFileError, match="0..N-1"):
        load_official_split(folder, 1)


def test_official_split_checks_ids(tmp_path):
    folder = make_folder(tmp_path, {0: [0, 2], 1: [3, 1]}, test=("A",))
    with pytest.raises(ValueError, match="both train.csv and test.csv"):
        load_official_split(folder, 1)


def test_a_tiny_file_cannot_make_numpy_allocate_or_crash(tmp_path):
    """A pickled array's state is checked before NumPy builds it: a file of a few hundred bytes asking for a
    huge array, or an object array with too short a list (which crashed the interpreter), is refused."""
    import subprocess
    import sys

    script = r'''
import io, pickle, resource, sys
import numpy as np
from numpy.lib import format as npformat
from preprocess.ffl4mia import PartitionFileError, load_partition_file
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

class Array:
    def __init__(self, state):
        self.state = state
    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(0))[0], (np.ndarray, (0,), b"b"), self.state)

for i, state in enumerate([(1, (300_000_000,), np.dtype("f8"), False, b""),
                           (1, (300_000_000,), np.dtype("O"), False, [0]),
                           (1, (10 ** 12,), np.dtype("i8"), False, b"")]):
    outer = np.empty((), dtype=object)
    outer[()] = {0: Array(state)}
    f = io.BytesIO()
    npformat.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
    pickle.dump(outer, f, protocol=3)
    path = sys.argv[1] + f"/bomb{i}.npy"
    open(path, "wb").write(f.getvalue())
    try:
        load_partition_file(path)
        print("LOADED", i)
    except PartitionFileError as e:
        print(len(f.getvalue()), "refused:", e)
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)
'''
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert [line for line in lines if "refused" in line and int(line.split()[0]) < 500] == lines[:3], p.stdout
    assert "unexpected dtype 'f8'" in lines[0] or "not a partition" in lines[0]
    assert "is not a partition" in lines[1] and "is not a partition" in lines[2]
    assert int(lines[3].split()[1]) < 100  # no gigabyte-sized allocation happened


def test_shared_lists_cannot_amplify_a_small_file(tmp_path):
    """Pickle's memo lets a tiny file name one list many times (a list of a thousand lists of a thousand lists of a
    thousand zeros is 10 kB): such a file is refused at once, without building what it describes."""
    import subprocess
    import sys

    script = r'''
import pickle, resource, sys, time
import numpy as np
from numpy.lib import format as npformat
from preprocess.ffl4mia import PartitionFileError, load_partition_file
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
zeros = [0] * 1000
nested = [[zeros] * 1000] * 1000
shared = list(range(1_000_000))
for i, content in enumerate([{0: nested}, {k: shared for k in range(100)}]):
    outer = np.empty((), dtype=object)
    outer[()] = content
    path = sys.argv[1] + f"/amplify{i}.npy"
    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(outer, f, protocol=3)
    del outer
    t0 = time.time()
    try:
        load_partition_file(path)
        print("LOADED", i)
    except PartitionFileError as e:
        print(f"{time.time() - t0:.1f}", "refused:", e)
del nested, shared, zeros
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) // 1024)
'''
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert "row indices must be ints" in lines[0] and float(lines[0].split()[0]) < 2, p.stdout
    assert "holds 100000000 row indices; no partition is that large" in lines[1], p.stdout
    assert float(lines[1].split()[0]) < 5, p.stdout


def test_a_deeply_nested_file_is_refused_with_a_short_message(tmp_path):
    """A list nested 200,000 deep (a few hundred kB of pickle opcodes, which the unpickler builds without
    recursion): one bounded error line, no RecursionError and no crash."""
    import io
    import subprocess
    import sys

    depth = 200_000
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    # {0: [[[...[0]...]]]}: EMPTY_DICT, key 0, depth EMPTY_LISTs, 0, depth APPENDs, SETITEM, STOP
    payload = b"\x80\x03}K\x00" + b"]" * depth + b"K\x00" + b"a" * depth + b"s."
    (tmp_path / "deep.npy").write_bytes(header.getvalue() + payload)
    script = """
import sys
from preprocess.ffl4mia import PartitionFileError, load_partition_file
try:
    load_partition_file(sys.argv[1])
    print("LOADED")
except PartitionFileError as e:
    print(len(str(e)), str(e)[:200])
"""
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "deep.npy")], capture_output=True, text=True,
                       timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    length, message = p.stdout.split(" ", 1)
    assert int(length) < 400 and "deep.npy" in message and "row indices must be ints" in message, p.stdout
