import os

import pytest

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


def test_published_renames_whole_files_with_normal_permissions_from_unique_temp_names(tmp_path):
    from tokensparse.files import published

    target, other = tmp_path / "w.safetensors", tmp_path / "w.json"
    umask = os.umask(0o022)
    try:
        with published(target, other) as (a, b), published(target) as (c,):
            assert len({a, b, c}) == 3 and all(t.parent == tmp_path for t in (a, b, c))
            assert a.name.startswith(".w.safetensors.") and a.name.endswith(".tmp")  # hidden, and `*.tmp`
            a.write_text("a")
            b.write_text("b")
            c.write_text("c")
            assert not target.exists()  # nothing is published before the block ends
    finally:
        os.umask(umask)
    assert target.read_text() == "a" and other.read_text() == "b"  # the outer block renamed last
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.safetensors"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_published_leaves_no_temp_file_and_the_old_files_when_the_block_fails(tmp_path, error):
    from tokensparse.files import published

    target = tmp_path / "w.png"
    target.write_text("old")
    with pytest.raises(type(error)):
        with published(target, tmp_path / "w.json") as (tmp, _):
            tmp.write_text("half")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["w.png"] and target.read_text() == "old"


def test_a_rename_that_fails_leaves_no_temp_file(tmp_path):
    from tokensparse.files import published

    (tmp_path / "w.json").mkdir()  # the second rename fails: the first file is in place, no temp file stays
    with pytest.raises(OSError):
        with published(tmp_path / "w.bin", tmp_path / "w.json") as (a, b):
            a.write_text("a")
            b.write_text("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "w.json"]


def test_temp_beside_makes_a_unique_file_or_folder_in_the_target_folder(tmp_path):
    from tokensparse.files import temp_beside

    made = [temp_beside(tmp_path / "step_1", folder=True), temp_beside(tmp_path / "step_1", folder=True),
            temp_beside(tmp_path / "x.png")]
    assert len(set(made)) == 3 and made[0].is_dir() and made[2].is_file() and made[2].stat().st_size == 0
    assert all(p.parent == tmp_path and p.name.endswith(".tmp") for p in made)
    assert made[0].name.startswith(".step_1.") and made[2].name.startswith(".x.png.")


@pytest.mark.parametrize("error", [OSError("disk full"), SystemExit(143)])
def test_output_folder_removes_only_the_folders_it_made_when_the_block_fails(tmp_path, error):
    from tokensparse.files import output_folder

    (tmp_path / "kept").mkdir()
    with pytest.raises(type(error)):
        with output_folder(tmp_path / "kept" / "a" / "b") as folder:
            assert folder.is_dir()
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    with output_folder(tmp_path / "kept" / "a" / "b") as folder:  # a block that ends keeps them
        (folder / "x").write_text("x")
    assert (tmp_path / "kept" / "a" / "b" / "x").is_file()


def test_output_folder_keeps_a_made_folder_another_writer_filled(tmp_path):
    from tokensparse.files import output_folder

    with pytest.raises(OSError):
        with output_folder(tmp_path / "a" / "b"):
            (tmp_path / "a" / "other.png").write_text("x")  # written there meanwhile
            raise OSError("disk full")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["other.png"]  # b removed, a kept: not empty


def test_output_folder_refuses_a_file_in_the_way_like_mkdir(tmp_path):
    from tokensparse.files import output_folder

    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        with output_folder(tmp_path / "f" / "sub"):
            pass
    with pytest.raises(FileExistsError):
        with output_folder(tmp_path / "f"):
            pass


@pytest.mark.parametrize("as_set", [False, True])
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_ctrl_c_while_a_set_is_renamed_replaces_all_of_it_or_none(tmp_path, monkeypatch, as_set, name):
    import signal

    from tokensparse.files import published

    sig = getattr(signal, name)
    paths = [tmp_path / f"out-layer{i}.png" for i in (1, 2, 3)]
    for path in paths:
        path.write_text("old")
    replace = os.replace

    def interrupted(src, dst):  # the signal arrives right after the first rename
        replace(src, dst)
        if dst == paths[0]:
            signal.raise_signal(sig)

    def stop(signum, frame):  # what the CLI does on SIGTERM (Python's default would end the test run)
        raise SystemExit(128 + signum)

    monkeypatch.setattr(os, "replace", interrupted)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt if name == "SIGINT" else SystemExit):
            with published(*paths, as_set=as_set) as tmps:
                for tmp in tmps:
                    tmp.write_text("new")
        assert signal.getsignal(signal.SIGTERM) is stop  # the handlers are back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [p.read_text() for p in paths] == (["new"] * 3 if as_set else ["new", "old", "old"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupts_held_changes_nothing_outside_the_main_thread(tmp_path):
    import signal
    import threading

    from tokensparse.files import interrupts_held

    seen = []

    def worker():
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
