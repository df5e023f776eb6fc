import os

from tokensparse.files import default_mode


def test_default_mode_undoes_owner_only_temp_files(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x")
    os.chmod(path, 0o600)
    umask = os.umask(0o022)
    try:
        assert default_mode(path) == path
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_folder_problem_looks_at_the_nearest_existing_ancestor(tmp_path, monkeypatch):
    from tokensparse.files import folder_problem, nearest_existing

    assert nearest_existing(tmp_path / "a" / "b") == tmp_path and nearest_existing(tmp_path) == tmp_path
    assert folder_problem(tmp_path / "a" / "b") is None  # missing folders are made when saving
    (tmp_path / "f").write_text("")
    assert folder_problem(tmp_path / "f" / "sub") == f"{tmp_path / 'f'} is a file, not a folder"
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: p != tmp_path and access(p, mode, **kw))
    assert folder_problem(tmp_path / "new") == f"cannot write in {tmp_path}"
