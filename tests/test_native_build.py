"""runtime/native_build.py: the C++ sources compile a file per core, then link, under a lock
that makes processes starting together build a library once; a failing file is a one-line
error that leaves nothing half-written in the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

SOURCES = {"one.cc": 'extern "C" int one() { return 1; }\n',
           "two.cc": 'extern "C" int two() { return 2; }\n'}

# a compiler that logs each call, and is slow enough that builders starting together overlap
LOGGING_CXX = """#!/bin/sh
echo "$@" >> {log}
sleep 0.5
exec g++ "$@"
"""

LOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from runtime import native_build
    sources = [Path(p) for p in sys.argv[1:]]
    library = native_build.loaded_library("probe", sources, "the probe")
    print(library.one() + library.two())
""")


@pytest.fixture
def sources(tmp_path):
    paths = []
    for name, text in SOURCES.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    return paths


def _compiler(tmp_path):
    log = tmp_path / "calls.log"
    script = tmp_path / "cxx"
    script.write_text(LOGGING_CXX.format(log=log))
    script.chmod(0o755)
    return script, log


def test_builders_starting_together_build_once(tmp_path, sources):
    cxx, log = _compiler(tmp_path)
    env = dict(os.environ, CXX=str(cxx), RUNTIME_KERNEL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, *map(str, sources)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["3", "3", "3"]
    calls = log.read_text().splitlines()
    # one compile per file, then one link: by whichever process took the lock first
    assert sum(" -c " in call for call in calls) == len(SOURCES), calls
    assert sum(" -shared " in call for call in calls) == 1, calls
    built = [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".so"]
    assert len(built) == 1 and not [p for p in (tmp_path / "cache").iterdir()
                                    if p.name.startswith(".")]


def test_a_failing_file_is_one_line_and_leaves_no_library(tmp_path, sources, monkeypatch):
    from runtime import native_build
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("RUNTIME_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError) as error:
        native_build.loaded_library("probe", [*sources, broken], "the probe")
    message = str(error.value)
    assert "\n" not in message and "failed on the probe" in message and "broken.cc" in message
    cache = tmp_path / "cache"
    assert not [p for p in cache.iterdir() if p.suffix == ".so" or p.name.startswith(".")]
