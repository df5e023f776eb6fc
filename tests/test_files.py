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
