"""tools.paths.confine: a path is allowed only when its resolved parent lies inside a root and its last
component is not a symlink."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tools.paths import PathNotAllowedError, confine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "root"


def real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def test_a_nested_path_whose_parents_do_not_exist_is_accepted_without_creating_them(root: Path) -> None:
    assert confine(f"{root}/a/b/c.txt", [str(root)]) == real(root) / "a" / "b" / "c.txt"
    assert not (root / "a").exists()


def test_a_path_inside_any_of_several_roots_is_accepted(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    assert confine(f"{other}/x", [str(root), str(other)]) == real(other) / "x"


def test_a_root_behind_a_symlink_is_allowed(root: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert confine(f"{alias}/x", [str(alias)]) == real(root) / "x"
    assert confine(f"{root}/x", [str(alias)]) == real(root) / "x"


def test_a_relative_path_is_refused(root: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="not absolute"):
        confine("root/motd", [str(root)])


def test_an_empty_path_is_refused(root: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="not absolute"):
        confine("", [str(root)])


@pytest.mark.parametrize("tail", ["../outside/x", "a/../../outside/x", "../root-twin/x", "..", "../../etc/passwd"])
def test_a_dot_dot_escape_is_refused(root: Path, tail: str) -> None:
    with pytest.raises(PathNotAllowedError):
        confine(f"{root}/{tail}", [str(root)])


def test_a_sibling_sharing_the_roots_name_as_prefix_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "root-twin").mkdir()
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        confine(f"{tmp_path}/root-twin/x", [str(root)])


def test_a_symlinked_directory_pointing_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        confine(f"{root}/link/x", [str(root)])


def test_a_dangling_symlinked_directory_pointing_out_of_the_root_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "dangling").symlink_to(tmp_path / "not-yet", target_is_directory=True)
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        confine(f"{root}/dangling/sub/x", [str(root)])


@pytest.mark.parametrize("target", ["root/real", "outside/real", "nowhere"])
def test_a_final_component_symlink_is_refused_wherever_it_points(root: Path, tmp_path: Path, target: str) -> None:
    (tmp_path / "root" / "real").write_text("x")
    (tmp_path / "outside" / "real").write_text("x")
    (root / "ln").symlink_to(tmp_path / target)
    with pytest.raises(PathNotAllowedError, match="symbolic link"):
        confine(f"{root}/ln", [str(root)])


@pytest.mark.parametrize("suffix", ["", "/", "/.", "/sub/.."])
def test_the_root_itself_is_refused_and_the_message_says_so(root: Path, suffix: str) -> None:
    with pytest.raises(PathNotAllowedError) as refused:
        confine(f"{root}{suffix}", [str(root)])
    assert "outside" not in str(refused.value), "the root is not outside itself"
    assert "names no file in it" in str(refused.value) or "does not name a file" in str(refused.value)


def test_no_roots_configured_refuses_everything(root: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="none are configured"):
        confine(f"{root}/x", [])


def test_a_nul_byte_is_refused(root: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="NUL"):
        confine(f"{root}/x\x00y", [str(root)])
