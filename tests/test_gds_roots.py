"""gpuwire.gds.roots: only files under the data roots can be resolved or opened."""
import os

import pytest

from gpuwire.gds.roots import DataRoots, OutsideDataRootsError


@pytest.fixture
def tree(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    outside = tmp_path / "outside"
    for d in (a, b, outside, a / "sub"):
        d.mkdir()
    (a / "x.bin").write_bytes(b"x")
    (a / "sub" / "y.bin").write_bytes(b"y")
    (b / "z.bin").write_bytes(b"z")
    (outside / "secret").write_bytes(b"s")
    return tmp_path


def test_relative_and_absolute_paths_inside_resolve(tree):
    roots = DataRoots([tree / "a", tree / "b"])
    assert roots.resolve("x.bin") == os.path.realpath(tree / "a" / "x.bin")
    assert roots.resolve("z.bin") == os.path.realpath(tree / "b" / "z.bin")  # second root
    assert roots.resolve(str(tree / "a" / "sub" / "y.bin")) == os.path.realpath(tree / "a" / "sub" / "y.bin")
    assert roots.resolve("sub/../x.bin") == os.path.realpath(tree / "a" / "x.bin")


def test_dotdot_escape_is_refused(tree):
    roots = DataRoots([tree / "a"])
    with pytest.raises(OutsideDataRootsError) as e:
        roots.resolve("../outside/secret")
    assert isinstance(e.value, PermissionError)
    msg = str(e.value)
    assert "../outside/secret" in msg and os.path.realpath(tree / "a") in msg


def test_absolute_path_outside_is_refused(tree):
    roots = DataRoots([tree / "a"])
    with pytest.raises(PermissionError, match="secret"):
        roots.resolve(str(tree / "outside" / "secret"))
    with pytest.raises(PermissionError):
        roots.resolve("/etc/passwd")


def test_prefix_sibling_is_not_inside(tree):
    (tree / "a2").mkdir()
    (tree / "a2" / "f").write_bytes(b"f")
    roots = DataRoots([tree / "a"])
    with pytest.raises(PermissionError):
        roots.resolve(str(tree / "a2" / "f"))


def test_symlink_leading_out_is_refused(tree):
    os.symlink(tree / "outside" / "secret", tree / "a" / "link")
    os.symlink(tree / "outside", tree / "a" / "dirlink")
    roots = DataRoots([tree / "a"])
    with pytest.raises(PermissionError, match="link"):
        roots.resolve("link")
    with pytest.raises(PermissionError):
        roots.resolve("dirlink/secret")
    with pytest.raises(PermissionError):
        roots.open_fd("link")


def test_symlink_inside_is_allowed(tree):
    os.symlink(tree / "a" / "sub" / "y.bin", tree / "a" / "ylink")
    os.symlink(tree / "b" / "z.bin", tree / "a" / "zlink")  # into another root
    roots = DataRoots([tree / "a", tree / "b"])
    assert roots.resolve("ylink") == os.path.realpath(tree / "a" / "sub" / "y.bin")
    assert roots.resolve("zlink") == os.path.realpath(tree / "b" / "z.bin")
    fd = roots.open_fd("ylink")
    try:
        assert os.read(fd, 10) == b"y"
    finally:
        os.close(fd)


def test_root_given_through_a_symlink(tree):
    os.symlink(tree / "a", tree / "alias")
    roots = DataRoots([tree / "alias"])
    assert roots.resolve(str(tree / "a" / "x.bin")) == os.path.realpath(tree / "a" / "x.bin")
    assert roots.resolve(str(tree / "alias" / "x.bin")) == os.path.realpath(tree / "a" / "x.bin")


def test_missing_file_inside_names_the_path(tree):
    roots = DataRoots([tree / "a"])
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        roots.resolve("nope.bin")
    assert roots.resolve("nope.bin", must_exist=False) == os.path.realpath(tree / "a" / "nope.bin")


def test_missing_file_outside_is_refused_not_reported_missing(tree):
    roots = DataRoots([tree / "a"])
    with pytest.raises(PermissionError):
        roots.resolve("../outside/nope")


def test_directory_is_not_a_file(tree):
    roots = DataRoots([tree / "a"])
    with pytest.raises(IsADirectoryError):
        roots.resolve("sub")


def test_empty_roots_refuse_everything(tree):
    roots = DataRoots([])
    assert not roots
    with pytest.raises(PermissionError, match="no data roots"):
        roots.resolve(str(tree / "a" / "x.bin"))


def test_bad_paths(tree):
    roots = DataRoots([tree / "a"])
    for bad in ("", "x\x00.bin"):
        with pytest.raises(PermissionError):
            roots.resolve(bad)


def test_missing_root_is_an_error(tree):
    with pytest.raises(FileNotFoundError, match="nope"):
        DataRoots([tree / "nope"])


def test_reader_with_roots_refuses_outside(tree):
    import numpy as np

    from gpuwire.gds import HostReader

    r = HostReader(roots=DataRoots([tree / "a"]))
    buf = r.alloc(1)
    assert r.read_into("x.bin", 0, 1, buf) == 1 and bytes(buf) == b"x"
    with pytest.raises(PermissionError):
        r.read_into("../outside/secret", 0, 1, buf)
    assert np.asarray(buf)[0] == ord("x")
    r.close()


def test_open_beneath_follows_nothing(tree):
    """The open of a resolved path walks it from the root with O_NOFOLLOW: a directory
    swapped for a symlink since the resolve (here leading out) fails without being
    followed; open_fd names the path as outside and accepts regular files only."""
    roots = DataRoots([tree / "a"])
    real = roots.resolve("sub/y.bin")
    fd = roots.open_beneath(real)
    try:
        assert os.read(fd, 1) == b"y"
    finally:
        os.close(fd)
    (tree / "outside" / "y.bin").write_bytes(b"S")
    os.rename(tree / "a" / "sub", tree / "a" / "old")
    os.symlink(tree / "outside", tree / "a" / "sub")
    with pytest.raises(OSError):
        roots.open_beneath(real)
    with pytest.raises(OutsideDataRootsError):
        roots.open_beneath(str(tree / "outside" / "y.bin"))
    with pytest.raises(OutsideDataRootsError):
        roots.open_fd("sub/y.bin")
    os.mkfifo(tree / "a" / "fifo")
    with pytest.raises(OSError, match="fifo.*not a regular file"):
        roots.open_fd("fifo")


def test_open_fd_errors_name_the_clients_path(tree, monkeypatch):
    """A file gone between the resolve and the open: FileNotFoundError naming the path as
    the client gave it (not only its last component)."""
    roots = DataRoots([tree / "a"])
    real = roots.resolve("sub/y.bin")
    monkeypatch.setattr(roots, "resolve", lambda p, must_exist=True: real)
    os.unlink(real)
    with pytest.raises(FileNotFoundError) as e:
        roots.open_fd("sub/y.bin")
    assert e.value.filename == "sub/y.bin"
