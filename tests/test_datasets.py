"""``fedclinic datasets``: fetching from a local HTTP server standing in for the publishers
(no internet here), checksums, a corrupted and an interrupted download (nothing left at the
final path), and where :func:`dataset_path` looks."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedclinic import datasets
from fedclinic.cli import main
from fedclinic.datasets import (
    DATASETS,
    SHARED,
    PublicDataset,
    RemoteFile,
    dataset_path,
    fetch,
)
from fedclinic.errors import FedClinicError, IntegrityError

needs_shared = pytest.mark.skipif(
    not (SHARED / "heart_disease").is_dir(), reason="the shared reference data is not here"
)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``served``; ``cut`` names files whose body stops half way (connection lost)."""

    served: Path
    cut: frozenset[str] = frozenset()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, directory=str(self.served), **kwargs)  # type: ignore[arg-type]

    def do_GET(self) -> None:
        name = self.path.strip("/").split("?")[0]
        if name not in self.cut:
            super().do_GET()
            return
        body = (self.served / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, type[Handler]]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Serving", (Handler,), {"served": served})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served, handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def serve_heart(served: Path) -> None:
    for file in DATASETS["heart-disease"].files:
        (served / file.name).write_bytes((SHARED / "heart_disease" / file.name).read_bytes())


@needs_shared
def test_recorded_checksums_are_those_of_the_reference_copies() -> None:
    """Independent of the module: hashlib over the copies beside CI."""
    for file in DATASETS["heart-disease"].files:
        blob = (SHARED / "heart_disease" / file.name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == file.sha256
    pneumonia = (SHARED / "pneumoniamnist.npz").read_bytes()
    ((known, _),) = DATASETS["pneumoniamnist"].variants
    assert hashlib.sha256(pneumonia).hexdigest() == known
    # ... and the CI copy is not the Zenodo file MedMNIST records
    assert hashlib.md5(pneumonia).hexdigest() != DATASETS["pneumoniamnist"].files[0].md5


@needs_shared
def test_fetch_from_a_server_then_path(
    server: tuple[str, Path, type[Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url, served, _ = server
    serve_heart(served)
    home = tmp_path / "home"
    monkeypatch.setenv(datasets.ENVIRONMENT, str(home))
    assert main(["datasets", "fetch", "heart-disease", "--mirror", url]) == 0
    assert "checksums match" in capsys.readouterr().out
    assert sorted(p.name for p in home.iterdir()) == ["heart_disease"]  # no leftovers
    assert dataset_path("heart-disease") == home / "heart_disease"
    assert main(["datasets", "path", "heart-disease"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "heart_disease")
    # fetched again: already there and matching, nothing downloaded
    for file in served.iterdir():
        file.unlink()
    assert fetch("heart-disease", home, url) == home / "heart_disease"


@needs_shared
def test_a_corrupted_download_leaves_nothing(
    server: tuple[str, Path, type[Handler]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, served, _ = server
    serve_heart(served)
    with (served / "processed.va.data").open("ab") as handle:
        handle.write(b"63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n")  # one row too many
    home = tmp_path / "home"
    with pytest.raises(IntegrityError, match=r"processed\.va\.data has SHA-256 .*nothing was kept"):
        fetch("heart-disease", home, url)
    assert list(home.iterdir()) == []
    assert main(["datasets", "fetch", "heart-disease", "--dir", str(home), "--mirror", url]) == 1
    assert "not the published file" in capsys.readouterr().err
    assert list(home.iterdir()) == []


@needs_shared
def test_an_interrupted_download_leaves_nothing(
    server: tuple[str, Path, type[Handler]], tmp_path: Path
) -> None:
    url, served, handler = server
    serve_heart(served)
    handler.cut = frozenset({"processed.hungarian.data"})
    home = tmp_path / "home"
    with pytest.raises(FedClinicError, match="stopped after 5131 of 10263 bytes"):
        fetch("heart-disease", home, url)
    assert list(home.iterdir()) == []
    handler.cut = frozenset()
    assert fetch("heart-disease", home, url).is_dir()  # a second try works


def test_a_single_file_verified_by_md5(
    server: tuple[str, Path, type[Handler]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that records only MD5 (MedMNIST): the file lands under its name."""
    url, served, _ = server
    blob = b"not really an npz, but the bytes the publisher recorded"
    (served / "tiny.npz").write_bytes(blob)
    tiny = PublicDataset(
        "tiny", "tiny.npz", (RemoteFile("tiny.npz", "", md5=hashlib.md5(blob).hexdigest()),), "-"
    )
    monkeypatch.setitem(DATASETS, "tiny", tiny)
    assert fetch("tiny", tmp_path / "home", url).read_bytes() == blob
    (served / "tiny.npz").write_bytes(blob + b"!")
    with pytest.raises(IntegrityError, match="has MD5"):
        fetch("tiny", tmp_path / "other", url)
    assert list((tmp_path / "other").iterdir()) == []


def test_lookup_order_and_a_missing_data_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, shared = tmp_path / "home", tmp_path / "shared"
    monkeypatch.setenv(datasets.ENVIRONMENT, str(home))
    monkeypatch.setattr(datasets, "SHARED", shared)
    with pytest.raises(FedClinicError, match="run 'fedclinic datasets fetch pneumoniamnist'"):
        dataset_path("pneumoniamnist")
    shared.mkdir()
    (shared / "pneumoniamnist.npz").write_bytes(b"x")
    assert dataset_path("pneumoniamnist") == shared / "pneumoniamnist.npz"
    home.mkdir()
    (home / "pneumoniamnist.npz").write_bytes(b"y")
    assert dataset_path("pneumoniamnist") == home / "pneumoniamnist.npz"  # FEDCLINIC_DATA first
    monkeypatch.delenv(datasets.ENVIRONMENT)
    assert datasets.data_home().name == "fedclinic"  # the per-user data folder
    with pytest.raises(IntegrityError, match="not a recorded version"):
        datasets.verify("pneumoniamnist", home / "pneumoniamnist.npz")
