"""Several workers on one study (autotune.workers), CPU and predict mode: a real PostgreSQL server and
the journal file backend; exact trial counts, a worker killed mid-trial, storage errors, no leaked password.

The PostgreSQL server is started here from Debian's `postgresql` package (.ci/run installs it) in a
throwaway folder, as the `postgres` user when the tests run as root (initdb refuses root); the tests
that need it are skipped, with the reason, when the binaries are missing.
"""

import glob
import json
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from autotune import study as S
from autotune import workers as W

ROOT = pathlib.Path(__file__).resolve().parents[1]
PASSWORD = "Tr1al-s3cret"  # must never appear in output, JSON or report
STUDY = "a100-sxm-80gb-phi3-mini-latency"
FAST = ["--gpu", "a100", "--model", "phi3", "--mode", "predict", "--workload", "prefill=1024", "--heartbeat", "1"]
WARM_START = 5  # configs the warm start enqueues for this workload (default + 4 roofline picks)


# ------------------------------------------------------------------ PostgreSQL server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> pathlib.Path | None:
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    return pathlib.Path(max(found, key=lambda p: int(pathlib.Path(p).parts[-3]))).parent


class PostgresServer:
    def __init__(self, port: int, admin_url: str):
        self.port = port
        self.admin_url = admin_url
        self._made = 0

    def new_database(self) -> str:
        """A fresh database; its URL as a user would type it (password included)."""
        import psycopg2

        self._made += 1
        name = f"autotune_{self._made}"
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=PASSWORD,
                                dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
                    "install Debian's postgresql package (.ci/run does)")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[test]'")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    base = pathlib.Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    if owner:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    pwfile = base / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if owner:
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"
    port = _free_port()

    def pg(*cmd):
        return subprocess.run(run_as + [str(bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)

    out = pg("initdb", "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8")
    if out.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"initdb failed: {out.stderr[-2000:]}")
    # fsync off: a throwaway server; scram over TCP so that a wrong password is refused
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    out = pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start")
    if out.returncode != 0:
        text = log.read_text()[-2000:] if log.exists() else out.stderr
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {text}")
    try:
        yield PostgresServer(port, f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres")
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")  # throwaway data
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["postgresql", "journal"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return request.getfixturevalue("postgres").new_database()
    return f"journal:{tmp_path / 'study.journal'}"


# ------------------------------------------------------------------ helpers

def cli(*args, env_extra=None, popen=False, **kw):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [sys.executable, "-m", "autotune", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kw)


def close(storage):
    engine = getattr(storage, "engine", None)  # RDBStorage: give its pooled connections back to the server
    if engine is not None:
        engine.dispose()


def trials_of(url, states=None):
    """The study's trials, read through a storage that is closed again (tests poll: no connection leaks)."""
    storage = S.open_storage(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.load_study(study_name=STUDY, storage=storage).get_trials(states=states)
    finally:
        close(storage)


def retried_numbers(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def assert_no_password(tmp_path, *texts):
    for text in texts:
        assert PASSWORD not in text
    for path in tmp_path.rglob("*"):  # the exported JSON, the report and whatever else was written
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


def assert_settled(url, counted: int):
    """Every trial finished; `counted` of them ran to an end (the others were failed as stale and retried);
    numbers and ids unique."""
    trials = trials_of(url)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert len({t._trial_id for t in trials}) == len(trials)
    assert all(t.state in W.FINISHED for t in trials), [(t.number, t.state.name) for t in trials]
    stale = retried_numbers(trials)
    assert sum(t.number not in stale for t in trials) == counted
    return trials


# ------------------------------------------------------------------ tests

def test_plan_devices():
    assert W.plan_devices(None, None, "predict") is None and W.plan_devices(1, None, "live", 1) is None
    assert W.plan_devices(3, None, "predict") == [None, None, None]
    assert W.plan_devices(2, None, "live", 4) == ["0", "1"]
    assert W.plan_devices(None, "1, 3", "live", 4) == ["1", "3"]
    assert W.plan_devices(2, "0,1", "predict") == ["0", "1"]
    for workers, devices, mode, count, needle in [(0, None, "predict", 0, ">= 1"), (3, "0,1", "live", 4, "lists 2"),
                                                  (None, "0,0", "live", 4, "twice"), (4, None, "live", 2, "2 are visible"),
                                                  (None, "7", "live", 2, "no CUDA device 7"), (None, "x", "predict", 0, "index")]:
        with pytest.raises(ValueError, match=needle):
            W.plan_devices(workers, devices, mode, count)


def test_warm_start_is_claimed_once(storage_url):
    """Eight processes' worth of storages racing on a new study: exactly one may enqueue the warm start."""
    first = S.open_storage(storage_url)
    S.open_study(first, STUDY, "latency", 0)
    close(first)
    storages = [S.open_storage(storage_url) for _ in range(8)]
    barrier, wins = threading.Barrier(len(storages)), []

    def claim(storage):
        barrier.wait()
        wins.append(S.claim_warm_start(storage, STUDY))

    threads = [threading.Thread(target=claim, args=(s,)) for s in storages]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for storage in storages:
        close(storage)
    assert sorted(wins) == [False] * 7 + [True]


def test_workers_on_an_empty_database_create_the_schema_once(postgres):
    """Hosts starting together on a new database all create Optuna's tables; none may fail for it."""
    url = postgres.new_database()
    barrier, opened, errors = threading.Barrier(6), [], []

    def open_one():
        barrier.wait()
        try:
            opened.append(S.open_storage(url))
        except S.StorageError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for storage in opened:
        close(storage)
    assert errors == [] and len(opened) == 6


def test_journal_heartbeat_fails_and_retries_a_stale_trial(tmp_path):
    """Optuna 5 has no journal heartbeat; ours fails a trial whose heartbeat stopped, and queues its retry."""
    storage = S.open_storage(f"journal:{tmp_path / 'j.journal'}", heartbeat_interval=1)
    assert optuna.storages._heartbeat.is_heartbeat_enabled(storage)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 1.0})
    trial_id = study._pop_waiting_trial_id()  # RUNNING, as a worker that died right after asking leaves it
    storage.record_heartbeat(trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []
    time.sleep(2.3)  # grace period 2 s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)
    dead, retry = study.get_trials()
    assert dead.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == dead.number and retry.system_attrs["retry_history"] == [dead.number]
    assert retry.system_attrs["fixed_params"] == {"x": 1.0}
    # the retry inherits the old heartbeat; once popped it counts from its own start
    study._pop_waiting_trial_id()
    assert storage._get_stale_trial_ids(study._study_id) == []


def test_four_workers_run_exactly_the_requested_trials(storage_url, tmp_path):
    trials = 8
    out = cli(*FAST, "--storage", storage_url, "--workers", "4", "--trials", str(trials),
              "--out", str(tmp_path / "out"), "--report-dir", str(tmp_path / "report"),
              env_extra={W.SLEEP_ENV: "0.5"})  # every feasible trial lasts >= 0.5 s: all four workers get some
    assert out.returncode == 0, out.stderr[-3000:]
    done = assert_settled(storage_url, trials)
    assert len(done) == trials  # nobody died: no extra failed trials either
    # each trial ran once, in one worker, and was reported once
    ran = [line.split("] trial ")[1].split()[0] for line in out.stdout.splitlines() if "] trial " in line]
    assert sorted(map(int, ran)) == list(range(trials))
    assert len({(t.system_attrs[W.WORKER_ATTR]["pid"]) for t in done}) >= 2
    # the warm start was enqueued once: no config ran twice from it
    warm = [tuple(sorted(t.params.items())) for t in done if "warm_start" in t.user_attrs]
    assert len(warm) == WARM_START == len(set(warm))
    # exported and reported once, by the parent
    assert out.stdout.count("exported ") == 1 and out.stdout.count("report ") == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a100-sxm-80gb--phi3-mini.json"]
    doc = json.loads((tmp_path / "out" / "a100-sxm-80gb--phi3-mini.json").read_text())
    assert doc["study"]["trials"] == trials and doc["source"] == "predicted"
    assert_no_password(tmp_path, out.stdout, out.stderr)


def _wait_for_sleeping_trial(url, proc, timeout=120):
    """(trial, pid) of an original (not retried) trial that a worker holds mid-flight."""
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            trials = trials_of(url, states=(TrialState.RUNNING,))
        except Exception:  # the study is not created yet
            trials = []
        for t in trials:
            if W.SLEEP_ATTR in t.system_attrs and "failed_trial" not in t.system_attrs:
                return t, t.system_attrs[W.WORKER_ATTR]["pid"]
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no trial was mid-flight in time")


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line.split()[1] for line in fh if line.startswith("PPid:")))


def test_killed_worker_trial_is_failed_and_retried(storage_url, tmp_path):
    trials = WARM_START  # the retry is queued behind the warm start and still runs within the count
    # two workers, named by device on one backend (CUDA_VISIBLE_DEVICES is set even for CPU workers)
    workers = ["--devices", "0,1"] if storage_url.startswith("journal:") else ["--workers", "2"]
    proc = cli(*FAST, "--storage", storage_url, *workers, "--trials", str(trials), "--no-report",
               "--out", str(tmp_path / "out"), popen=True, env_extra={W.SLEEP_ENV: "1.5"})
    try:
        victim, pid = _wait_for_sleeping_trial(storage_url, proc)
        assert _parent_of(pid) == proc.pid  # one of the workers this test started, nothing else
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert f"died (killed by signal {signal.SIGKILL}) during trial {victim.number}" in stdout
    done = assert_settled(storage_url, trials)
    assert len(done) == trials + 1  # the killed trial stays, FAILED
    dead = done[victim.number]
    assert dead.state == TrialState.FAIL and dead.system_attrs[W.WORKER_ATTR]["pid"] == pid
    retries = [t for t in done if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.system_attrs["retry_history"] == [victim.number]
    assert retry.params == dead.params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.system_attrs[W.WORKER_ATTR]["pid"] != pid
    devices = {t.system_attrs[W.WORKER_ATTR]["device"] for t in done}
    assert devices == ({"0", "1"} if storage_url.startswith("journal:") else {None})
    assert f"retried as trial {retry.number}" in stdout
    assert (tmp_path / "out" / "a100-sxm-80gb--phi3-mini.json").exists()
    assert_no_password(tmp_path, stdout, stderr)


@pytest.mark.parametrize("case", ["wrong password", "no such database", "closed port"])
def test_bad_postgres_url_is_one_line_error(case, postgres, tmp_path):
    good = postgres.new_database()
    url = {"wrong password": good.replace(PASSWORD, PASSWORD + "x"),
           "no such database": good.rsplit("/", 1)[0] + "/nope",
           "closed port": f"postgresql://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/x"}[case]
    out = cli(*FAST, "--storage", url, "--workers", "2", "--trials", "2", "--no-export", "--no-report")
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --storage: cannot open"), out.stderr
    assert "Traceback" not in out.stderr and PASSWORD not in out.stderr + out.stdout
    assert "***" in lines[0]


def test_two_hosts_share_one_postgres_study(postgres, tmp_path):
    """Two commands at once (as on two hosts), two workers each: the warm start is enqueued once and
    each command adds its own --trials."""
    url = postgres.new_database()
    procs = [cli(*FAST, "--storage", url, "--workers", "2", "--trials", "4", "--no-report",
                 "--out", str(tmp_path / f"host{i}"), popen=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
        assert_no_password(tmp_path, stdout, stderr)
    assert sum("warm start: " in stdout for stdout, _ in outs) == 1
    done = assert_settled(url, 8)
    assert len(done) == 8
    warm = [tuple(sorted(t.params.items())) for t in done if "warm_start" in t.user_attrs]
    assert len(warm) == WARM_START == len(set(warm))
