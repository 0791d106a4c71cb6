"""tools/make_webui.py without a network: its clone path against local git repositories laid out like webui's."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_webui", ROOT / "tools" / "make_webui.py")
make_webui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_webui)

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def repository(path: Path, files: dict[str, str]) -> str:
    """A repository with one commit holding ``files``, then a later commit; returns the first commit's hash."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "pinned")
    pinned = git(path, "rev-parse", "HEAD")
    (path / "later.txt").write_text("a commit after the pinned one\n")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "later")
    return pinned


def launch_utils(pins: dict[str, tuple[str, str]]) -> str:
    """launch_utils.py lines in the form webui v1.10.1 writes them (URL variable, commit variable)."""
    lines = []
    for (url_var, commit_var), (url, commit) in pins.items():
        lines.append(f"    {url_var} = os.environ.get('{url_var.upper()}', \"{url}\")")
        lines.append(f"    {commit_var} = os.environ.get('{commit_var.upper()}', \"{commit}\")")
    return "\n".join(lines) + "\n"


def test_clone_path_checks_out_the_tag_and_the_pinned_commits(tmp_path, monkeypatch):
    origin = tmp_path / "origin"
    pins = {}
    for folder, url_var, commit_var in make_webui.WEBUI_REPOSITORIES:
        commit = repository(origin / folder, {"README": folder})
        pins[(url_var, commit_var)] = (str(origin / folder), commit)
    webui_origin = origin / "webui"
    repository(webui_origin, {"launch.py": "", "modules/launch_utils.py": launch_utils(pins)})
    git(webui_origin, "tag", make_webui.WEBUI_TAG, "HEAD~1")
    # webui honours these variables; so does make_webui: the BLIP pin is moved to the later commit.
    blip = origin / "BLIP"
    monkeypatch.setenv("BLIP_COMMIT_HASH", git(blip, "rev-parse", "HEAD"))

    webui = make_webui.make_webui_tree(tmp_path / "cache", shared=None, url=str(webui_origin))

    assert git(webui, "describe", "--tags") == make_webui.WEBUI_TAG
    for folder, url_var, commit_var in make_webui.WEBUI_REPOSITORIES:
        expected = git(blip, "rev-parse", "HEAD") if folder == "BLIP" else pins[(url_var, commit_var)][1]
        assert git(webui / "repositories" / folder, "rev-parse", "HEAD") == expected, folder
    assert make_webui.make_webui_tree(tmp_path / "cache", shared=None, url="/nonexistent") == webui  # reused


def test_a_webui_without_the_pins_is_refused_with_the_reason(tmp_path):
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "launch_utils.py").write_text("print('not webui')\n")
    with pytest.raises(make_webui.MakeError, match="assets_repo not found .* is this webui v1.10.1"):
        make_webui.pinned_repositories(tmp_path)


def test_a_failed_clone_says_so(tmp_path):
    with pytest.raises(make_webui.MakeError, match="cloning .* failed"):
        make_webui.make_webui_tree(tmp_path / "cache", shared=None, url=str(tmp_path / "no-such-repository"))
    assert not (tmp_path / "cache" / f"webui-{make_webui.WEBUI_TAG}").exists()


def test_shared_named_without_webui_is_refused(tmp_path):
    with pytest.raises(make_webui.MakeError, match="holds no webui-v1.10.1/launch.py"):
        make_webui.find_shared(str(tmp_path))


def test_offline_requirements_come_from_shared_and_online_ones_drop_torch_and_setuptools(tmp_path):
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "requirements_versions.txt").write_text("setuptools==69.5.1\r\ntorch\r\ngradio==3.41.2\r\ntorchsde==0.2.6\r\n")
    assert make_webui.webui_requirements(webui, None) == "gradio==3.41.2\ntorchsde==0.2.6\n"
    shared = tmp_path / "shared"
    (shared / "webui-offline").mkdir(parents=True)
    (shared / "webui-offline" / "requirements-cpu.txt").write_text("torch==2.13.0\n")
    assert make_webui.webui_requirements(webui, shared) == "torch==2.13.0\n"
