"""`fa4aot record` as a well-behaved wrapper (issue 23): the workload's own sitecustomize still
runs, the hook reaches only the process tree it means, signals reach the workload's process group,
temporary directories go on every exit path, and a signal death exits 128 + N.

The workloads make no attention call: nothing compiles, FA4 is never imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

#: How long a test waits for a process to reach a state (a loaded 2-core machine starts Python slowly).
WAIT_SECONDS = 60.0
#: Prefix of record's temporary directories (the generated sitecustomize, the record log).
TEMP_PREFIX = "fa4aot-record-"

#: What a Python process reports about itself: hooked by record or not, its path and environment.
PROBE = (
    "import json, os, sys; print(json.dumps({'hooked': 'fa4aot.tools.record_hook' in sys.modules, "
    "'path': sys.path, 'env': {k: os.environ.get(k) for k in "
    "('PYTHONPATH', 'FA4AOT_RECORD', 'FA4AOT_RECORD_HOOK')}}))"
)

#: The workload of the tree test: probes itself, a child of its own interpreter, a child of another
#: interpreter (a virtual environment: a tool the workload runs), and that tool's own child running
#: the recorder's interpreter again.
TREE_WORKLOAD = textwrap.dedent(
    """
    import json, subprocess, sys
    out, foreign, probe = sys.argv[1], sys.argv[2], sys.argv[3]
    exec_probe = "import subprocess, sys; sys.stdout.write(subprocess.check_output(sys.argv[1:]).decode())"
    def run(*cmd):
        return json.loads(subprocess.check_output(list(cmd)))
    report = {}
    exec(compile(probe.replace("print(", "report['self'] = ("), "probe", "exec"))
    report["self"] = json.loads(report["self"])
    report["child"] = run(sys.executable, "-c", probe)
    report["foreign"] = run(foreign, "-c", probe)
    report["foreign_child"] = run(foreign, "-c", exec_probe, sys.executable, "-c", probe)
    with open(out, "w") as f:
        json.dump(report, f)
    """
)

#: A workload that starts a child (in its process group), says both are ready, and on SIGINT or
#: SIGTERM notes the signal in a file named by its pid, then dies of it.
SIGNAL_WORKLOAD = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    d = sys.argv[1]
    def on(sig, _frame):
        open(os.path.join(d, f"{os.getpid()}.got{sig}"), "w").close()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on)
    role = sys.argv[2] if len(sys.argv) > 2 else "workload"
    if role == "workload":
        subprocess.Popen([sys.executable, __file__, d, "child"])
    open(os.path.join(d, f"{role}.{os.getpid()}.ready"), "w").close()
    time.sleep(300)
    """
)


def _record(out: Path, *cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli("record", "-o", str(out), "--", *cmd, check=False, env=env)


def test_the_workloads_own_sitecustomize_still_runs(tmp_path):
    """record's generated sitecustomize used to shadow the user's (found later on PYTHONPATH)."""
    user_site = tmp_path / "user-site"
    user_site.mkdir()
    marker = tmp_path / "user-sitecustomize-ran"
    (user_site / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    seen = tmp_path / "seen.json"
    workload = (
        "import json, sys, sitecustomize; "
        f"json.dump({{'site': sitecustomize.__file__, 'hooked': 'fa4aot.tools.record_hook' in sys.modules}}, "
        f"open({str(seen)!r}, 'w'))"
    )
    env = dict(os.environ, PYTHONPATH=str(user_site))
    p = _record(tmp_path / "m.yaml", sys.executable, "-c", workload, env=env)
    assert p.returncode == 1 and "no attention call" in p.stderr, p.stderr
    assert marker.exists(), "the user's sitecustomize did not run under fa4aot record"
    got = json.loads(seen.read_text())
    assert Path(got["site"]) == user_site / "sitecustomize.py"  # `import sitecustomize` is the user's
    assert got["hooked"]  # and FA4 is still hooked


def test_record_reaches_only_the_process_tree_it_means(tmp_path):
    """The workload and its children of the same interpreter are recorded; a Python of another
    environment it runs is not, gets nothing of fa4aot on its path, and passes nothing on."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    foreign = str(tmp_path / "venv" / "bin" / "python")
    (tmp_path / "workload.py").write_text(TREE_WORKLOAD)
    out = tmp_path / "tree.json"
    p = _record(tmp_path / "m.yaml", sys.executable, str(tmp_path / "workload.py"), str(out), foreign, PROBE)
    assert p.returncode == 1 and "no attention call" in p.stderr, p.stderr
    tree = json.loads(out.read_text())
    hook_dir = tree["self"]["env"]["FA4AOT_RECORD_HOOK"]
    assert hook_dir and Path(hook_dir).name.startswith(TEMP_PREFIX)
    assert tree["self"]["hooked"] and tree["child"]["hooked"]  # multi-process workloads: all recorded
    for name in ("self", "child"):  # their sys.path is their own: no hook dir, no fa4aot source tree
        assert hook_dir not in tree[name]["path"] and str(ROOT) not in tree[name]["path"], name
    for name in ("foreign", "foreign_child"):
        proc = tree[name]
        assert not proc["hooked"], f"{name}: a Python of another environment was hooked"
        assert hook_dir not in proc["path"] and str(ROOT) not in proc["path"], f"{name}: {proc['path']}"
        assert proc["env"]["FA4AOT_RECORD"] is None and hook_dir not in (proc["env"]["PYTHONPATH"] or "")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_a_workload_killed_by_a_signal_exits_128_plus_it(tmp_path, sig):
    """sys.exit(-9) used to exit 247 for a SIGKILLed workload."""
    p = _record(tmp_path / "m.yaml", sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(sig)})")
    assert p.returncode == 128 + sig, p.stderr
    assert f"the workload exited {128 + sig}" in p.stderr


def _wait_for(what: str, check, timeout: float = WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def _ready(d: Path) -> dict[str, int] | None:
    """{role: pid} once the workload and its child are both ready."""
    found = {p.name.split(".")[0]: int(p.name.split(".")[1]) for p in d.glob("*.ready")}
    return found if len(found) == 2 else None


def _start_signal_workload(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path, dict[str, int]]:
    """record running SIGNAL_WORKLOAD with a private TMPDIR; (record, TMPDIR, event dir, pids)."""
    tmpdir, events = tmp_path / "tmpdir", tmp_path / "events"
    tmpdir.mkdir()
    events.mkdir()
    (tmp_path / "workload.py").write_text(SIGNAL_WORKLOAD)
    cmd = [sys.executable, "-m", "fa4aot.tools.cli", "record", "-o", str(tmp_path / "m.yaml"), "--"]
    cmd += [sys.executable, str(tmp_path / "workload.py"), str(events)]
    rec = subprocess.Popen(cmd, env=dict(os.environ, TMPDIR=str(tmpdir)), stderr=subprocess.PIPE, text=True)
    try:
        pids = _wait_for("the workload and its child", lambda: _ready(events))
    except BaseException:
        rec.kill()
        rec.wait()
        raise
    return rec, tmpdir, events, pids


def _kill_leftovers(pids: dict[str, int]) -> None:
    for pid in pids.values():  # only the processes this test started, by pid
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_record_reaches_the_workloads_group_and_temp_dirs_go(tmp_path, sig):
    """SIGTERM used to kill record alone (the workload orphaned, temp dirs left); SIGINT made it
    SIGKILL the workload without passing the signal on."""
    rec, tmpdir, events, pids = _start_signal_workload(tmp_path)
    try:
        assert list(tmpdir.glob(f"{TEMP_PREFIX}*"))  # the hook dir and the log dir, while it runs
        rec.send_signal(sig)
        _, err = rec.communicate(timeout=WAIT_SECONDS)
        for role, pid in pids.items():
            assert (events / f"{pid}.got{int(sig)}").exists(), f"the {role} did not get {sig.name}"
        assert rec.returncode == 128 + sig, err
        assert not list(tmpdir.glob(f"{TEMP_PREFIX}*")), "record left temporary directories"
        _wait_for("the workload and its child to end", lambda: not any(map(_alive, pids.values())))
    finally:
        rec.kill()
        rec.wait()
        _kill_leftovers(pids)


def test_sigkill_to_record_does_not_orphan_the_workload(tmp_path):
    """A SIGKILLed record cannot forward anything: the workload gets SIGTERM from the kernel
    (parent-death signal) instead of running on, orphaned."""
    rec, _, events, pids = _start_signal_workload(tmp_path)
    try:
        rec.kill()
        rec.wait()
        _wait_for("the workload's SIGTERM", lambda: (events / f"{pids['workload']}.got{int(signal.SIGTERM)}").exists())
        _wait_for("the workload to end", lambda: not _alive(pids["workload"]))
    finally:
        _kill_leftovers(pids)
