"""`ray.storage: ship` without Ray: an experiment folder written in one place and kept in
step in another by the pieces `FolderShipper` sends and `FolderReceiver` applies."""

from __future__ import annotations

import os

from sa2va_contract.files import atomic_write_bytes
from sa2va_contract.shipping import FolderReceiver, FolderShipper, plant_seed, seed_files


def _sync(shipper: FolderShipper, receiver: FolderReceiver) -> list:
    chunks = list(shipper.changes())
    for chunk in chunks:
        receiver.apply(chunk)
    return chunks


def _same(a, b) -> bool:
    files = lambda root: {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    return files(a) == files(b)


def test_appends_travel_as_appends_and_replaced_files_whole(tmp_path):
    node, run = tmp_path / "scratch", tmp_path / "run"
    node.mkdir()
    shipper, receiver = FolderShipper(node, chunk_bytes=1000), FolderReceiver(run)
    log = node / "train.log"
    log.write_text("line 1\n")
    (node / "checkpoints").mkdir()
    atomic_write_bytes(node / "checkpoints" / "ckpt_1.zip", os.urandom(2500))
    first = _sync(shipper, receiver)
    assert _same(node, run) and sorted(c.path for c in first if c.last) == ["checkpoints/ckpt_1.zip", "train.log"]
    assert [len(c.data) for c in first if c.path.startswith("checkpoints")] == [1000, 1000, 500]  # in pieces

    with open(log, "a") as f:
        f.write("line 2\n")
    (appended,) = _sync(shipper, receiver)
    assert (appended.path, appended.offset, appended.data, appended.whole) == ("train.log", 7, b"line 2\n", False)
    assert not _sync(shipper, receiver)  # nothing changed, nothing sent

    atomic_write_bytes(node / "checkpoints" / "ckpt_1.zip", b"new")  # replaced: a new inode
    log.write_text("truncated and rewritten\n")  # same inode, its start changed
    again = _sync(shipper, receiver)
    assert all(c.whole for c in again) and _same(node, run)

    (node / "checkpoints" / "ckpt_1.zip").unlink()
    (gone,) = _sync(shipper, receiver)
    assert gone.deleted and not (run / "checkpoints" / "ckpt_1.zip").exists()


def test_a_file_rewritten_longer_in_place_is_sent_whole(tmp_path):
    """SB3's CSV writer rewrites its file in place when a new column appears: it grows,
    but its first bytes changed, so an append would corrupt it."""
    node, run = tmp_path / "scratch", tmp_path / "run"
    node.mkdir()
    shipper, receiver = FolderShipper(node), FolderReceiver(run)
    csv = node / "progress.csv"
    csv.write_text("a,b\n1,2\n")
    _sync(shipper, receiver)
    with open(csv, "r+") as f:
        f.write("a,b,c\n1,2,\n3,4,5\n")
    (chunk,) = _sync(shipper, receiver)
    assert chunk.whole and (run / "progress.csv").read_text() == "a,b,c\n1,2,\n3,4,5\n"


def test_a_whole_file_is_replaced_only_at_its_last_piece(tmp_path):
    node, run = tmp_path / "scratch", tmp_path / "run"
    node.mkdir()
    (run).mkdir()
    (run / "model.pt").write_bytes(b"old")
    shipper, receiver = FolderShipper(node, chunk_bytes=10), FolderReceiver(run)
    (node / "model.pt").write_bytes(b"x" * 25)
    pieces = list(shipper.changes())
    for piece in pieces[:-1]:
        receiver.apply(piece)
        assert (run / "model.pt").read_bytes() == b"old"  # a reader sees the old file until the new is whole
    receiver.apply(pieces[-1])
    assert (run / "model.pt").read_bytes() == b"x" * 25
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left
    receiver.apply(next(iter(FolderShipper(node, chunk_bytes=10).changes())))  # a first piece, never finished
    receiver.close()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_seed_carries_the_folder_with_only_the_checkpoint_resumed_from(tmp_path):
    run, node = tmp_path / "run", tmp_path / "scratch"
    (run / "checkpoints").mkdir(parents=True)
    for step in (64, 128):
        (run / "checkpoints" / f"ckpt_{step}.zip").write_bytes(f"model at {step}".encode())
    (run / "train.log").write_text("attempt 1\n")
    (run / "progress.csv").write_text("a\n1\n")
    (run / ".progress.csv.tmp").write_text("a temporary file of an atomic write")
    seed = seed_files(run, run / "checkpoints" / "ckpt_64.zip")
    assert sorted(rel for rel, _ in seed) == ["checkpoints/ckpt_64.zip", "progress.csv", "train.log"]

    plant_seed(node, seed)
    shipper, receiver = FolderShipper(node), FolderReceiver(run)
    shipper.mark_sent()
    assert not list(shipper.changes())  # the other side has all of it
    with open(node / "train.log", "a") as f:
        f.write("attempt 2\n")
    (chunk,) = _sync(shipper, receiver)
    assert not chunk.whole and (run / "train.log").read_text() == "attempt 1\nattempt 2\n"
    assert (run / "checkpoints" / "ckpt_128.zip").is_file()  # what was not sent is not deleted either
