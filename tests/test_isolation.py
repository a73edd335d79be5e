"""The suite keeps off the user's real home: each test has its own HOME, PIE_HOME and Hugging Face
cache, and a run that writes into the real ~/.pie or ~/.cache/huggingface fails (tests/conftest.py's
pytest_sessionfinish, shown here failing a real pytest run that leaks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import isolation
from timing import scaled

TESTS = Path(__file__).resolve().parent
LEAKY = '''
import os
from pathlib import Path

import isolation


def test_writes_where_it_is_told():
    for target in os.environ["LEAK_INTO"].split(","):
        folder = Path(isolation.ORIGINAL_ENV["HOME"]) / target
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "leaked").write_text("x")
'''


def _under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def test_this_test_has_its_own_homes(own_homes: Path) -> None:
    import huggingface_hub.constants

    from pie.config import pie_home
    from pie.tiny_model import tiny_model_dir

    assert Path(os.environ["HOME"]) == own_homes and not _under(own_homes, isolation.real_home())
    assert _under(pie_home(), own_homes) and _under(tiny_model_dir(), own_homes)
    assert _under(Path(os.environ["HF_HOME"]), own_homes) and _under(Path(os.environ["HF_HUB_CACHE"]), own_homes)
    # huggingface_hub read its cache folder once, at import: the run's temporary one, not the real one.
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    assert not any(_under(hub_cache, real) for real in isolation.watched_dirs())


def test_the_snapshot_sees_a_file_added_changed_and_removed(tmp_path: Path) -> None:
    root = tmp_path / "watched"
    empty = isolation.snapshot([root])
    assert isolation.changes(empty, isolation.snapshot([root])) == []
    (root / "models").mkdir(parents=True)
    created = isolation.snapshot([root])
    assert isolation.changes(empty, created) == [f"added {root}", f"added {root / 'models'}"]
    (root / "models" / "f").write_text("a")
    written = isolation.snapshot([root])
    assert f"added {root / 'models' / 'f'}" in isolation.changes(created, written)
    os.utime(root / "models" / "f", ns=(0, 12345))
    assert isolation.changes(written, isolation.snapshot([root])) == [f"changed {root / 'models' / 'f'}"]
    shutil.rmtree(root)
    assert f"removed {root / 'models' / 'f'}" in isolation.changes(written, isolation.snapshot([root]))


def _pytest_with_a_fake_home(tmp_path: Path, leak_into: str) -> subprocess.CompletedProcess[str]:
    """A pytest run with this suite's conftest, as if the user's home were tmp_path/real-home."""
    suite = tmp_path / "suite"
    suite.mkdir(parents=True)
    for name in ("conftest.py", "isolation.py"):
        shutil.copy(TESTS / name, suite / name)
    (suite / "test_leaky.py").write_text(LEAKY)
    home = tmp_path / "real-home"
    (home / ".pie" / "models").mkdir(parents=True)  # an existing pie home: a new file in it must be seen
    env = {k: v for k, v in isolation.ORIGINAL_ENV.items()
           if k not in ("PIE_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", *isolation.HF_OVERRIDES)}
    env.update(HOME=str(home), LEAK_INTO=leak_into, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                           str(suite)], cwd=suite, env=env, capture_output=True, text=True, timeout=scaled(120))


def test_a_run_that_writes_into_the_real_homes_fails(tmp_path: Path) -> None:
    """Its one test passes; the run fails for the files it left in the (fake) real homes. That the
    check stays quiet when nothing leaks, every clean run of this suite shows."""
    targets = (".pie/models/pie/tiny-random", ".cache/huggingface/hub")
    run = _pytest_with_a_fake_home(tmp_path, ",".join(targets))
    assert run.returncode == 1, run.stdout[-3000:]
    assert "1 passed" in run.stdout and "real home touched" in run.stdout
    for target in targets:
        assert f"added {tmp_path / 'real-home' / target / 'leaked'}" in run.stdout
