"""Compiler caches on disk: PyTorch's own artifacts, refused with a message when they cannot be used."""
import json

import pytest
import torch
from sd_webui_onediff.compile import cache_artifacts
from sd_webui_onediff.compile.cache_artifacts import CacheError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def compiled_something():
    """A small Inductor compile, so that this process has artifacts to save."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(8, 8)
    torch.compile(layer, backend="inductor")(torch.randn(2, 8))


def test_save_and_load_round_trip(tmp_path, compiled_something):
    path = cache_artifacts.save(tmp_path, "tiny-linear", CPU)
    assert path == tmp_path / "tiny-linear.torchcache" and path.stat().st_size > 0
    metadata = json.loads((tmp_path / "tiny-linear.json").read_text())
    assert metadata["environment"]["torch"] == torch.__version__
    assert cache_artifacts.list_caches(tmp_path) == ["tiny-linear"]
    cache_artifacts.load(tmp_path, "tiny-linear", CPU)


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "with space", ".hidden", "x.json"])
def test_invalid_names_are_refused(tmp_path, name):
    with pytest.raises(CacheError, match="invalid cache name"):
        cache_artifacts.save(tmp_path, name, CPU)


def test_missing_cache_says_so(tmp_path):
    with pytest.raises(CacheError, match="not found") as error:
        cache_artifacts.load(tmp_path, "nothing-here", CPU)
    assert error.value.reason == "not found" and str(tmp_path) not in error.value.reason


def test_cache_from_another_setup_is_refused(tmp_path, compiled_something):
    cache_artifacts.save(tmp_path, "elsewhere", CPU)
    metadata_path = tmp_path / "elsewhere.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["environment"]["torch"] = "2.7.0+cu126"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(CacheError, match=r"another setup: torch 2\.7\.0\+cu126 \(here ") as error:
        cache_artifacts.load(tmp_path, "elsewhere", CPU)
    assert error.value.reason == "made with another setup"


def test_damaged_cache_says_so(tmp_path, compiled_something):
    cache_artifacts.save(tmp_path, "damaged", CPU)
    (tmp_path / "damaged.torchcache").write_bytes(b"not a cache at all")
    with pytest.raises(CacheError, match="damaged") as error:
        cache_artifacts.load(tmp_path, "damaged", CPU)
    assert error.value.reason == "damaged"


def test_missing_metadata_says_so(tmp_path, compiled_something):
    cache_artifacts.save(tmp_path, "bare", CPU)
    (tmp_path / "bare.json").unlink()
    with pytest.raises(CacheError, match="no readable bare.json") as error:
        cache_artifacts.load(tmp_path, "bare", CPU)
    assert error.value.reason == "has no readable metadata"


def test_a_cache_is_read_once_per_file(tmp_path, compiled_something, monkeypatch):
    """Chosen for every generation, a cache is handed to PyTorch once, and again only when the file changed."""
    cache_artifacts.save(tmp_path, "chosen", CPU)
    reads = []
    load_artifacts = torch.compiler.load_cache_artifacts
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: reads.append(1) or load_artifacts(data))
    loaded = set()
    assert [cache_artifacts.load(tmp_path, "chosen", CPU, loaded) for _ in range(3)] == [True, False, False]
    assert len(reads) == 1
    cache_artifacts.save(tmp_path, "chosen", CPU)  # saved again: another file under the same name
    assert cache_artifacts.load(tmp_path, "chosen", CPU, loaded) and len(reads) == 2
