"""Several worker processes on one Optuna study: one per local GPU (live mode) or plain processes (predict).

    python -m autotune --gpu h100 --model llama3-8b --devices 0,1,2,3 --storage postgresql://...
    python -m autotune --gpu a100 --model phi3 --mode predict --workers 4      # journal file, one host

The parent opens the study, enqueues the warm start (once per study, see study.claim_warm_start),
starts the workers (spawned, CUDA_VISIBLE_DEVICES set per worker), waits, then exports and writes
the report once. Workers on other hosts may share the same study; each command counts its own trials.

Exact count. `--trials N` means N trials that this command's workers ran to an end (COMPLETE,
PRUNED, or FAIL raised by the objective). The parent holds N tickets in shared memory; a worker
takes one under a lock before it asks the study for a trial, so workers never start more than N
between them (optuna's MaxTrialsCallback checks only after a trial ends: workers already inside a
trial overshoot, and it cannot tell a dead worker's trial from a real failure). A trial whose
worker died does not count: its ticket comes back once the heartbeat has failed it and the
retry (same params, system attrs `failed_trial` / `retry_history`) is queued, and the retry takes
its place. After MAX_RETRY retries a config that keeps killing its worker counts as a failed trial.
The study therefore holds N + (trials of dead workers) new trials, none left RUNNING.

Dead workers. Every trial has a heartbeat (optuna's HeartbeatThread, `--heartbeat`, default
DEFAULT_HEARTBEAT_S when several processes share a study); a RUNNING trial without a heartbeat for
the grace period (2 x heartbeat) is failed and retried by the next `fail_stale_trials` call: each
worker makes one before every trial, and the parent polls while a dead worker's trial is pending,
so the last trial of a run is resolved too. RDBStorage (PostgreSQL, SQLite) keeps heartbeats in its
own table on the database clock; Optuna 5's JournalStorage has no heartbeat, so
HeartbeatJournalStorage adds one through optuna's BaseHeartbeat hook (a trial system attr).
The parent also sees its own workers die (exit by a signal) and starts a replacement while tickets
remain.

Testing aid: AUTOTUNE_TRIAL_SLEEP=SECONDS makes each worker pause that long inside every feasible
trial after its params are set (and marks the trial with the system attr SLEEP_ATTR), so a test
can kill a worker that is surely mid-trial. Not for real runs.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

DEFAULT_HEARTBEAT_S = 30  # seconds between heartbeats when several processes share a study
WORKER_ATTR = "autotune:worker"  # trial system attr: host, pid, worker index, device of the process running it
HEARTBEAT_ATTR = "autotune:heartbeat"  # journal storages only: time.time() of the trial's last heartbeat
SLEEP_ATTR = "autotune:test_sleep"  # set when AUTOTUNE_TRIAL_SLEEP holds a trial
SLEEP_ENV = "AUTOTUNE_TRIAL_SLEEP"
POLL_S = 0.5  # how often the parent looks at its workers
RETRY_WAIT_S = 30.0  # how long a failed dead-worker trial may go without its queued retry before a new trial replaces it
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def plan_devices(workers: int | None, devices: str | None, mode: str, cuda_count: int = 0) -> list[str | None] | None:
    """One entry per worker process: the CUDA device it sees (CUDA_VISIBLE_DEVICES), None for a plain
    process; None as a whole means one process, in the parent (the single-worker path).
    Raises ValueError with a one-line reason."""
    listed: list[str] | None = None
    if devices is not None:
        listed = [d.strip() for d in devices.split(",") if d.strip()]
        if not listed:
            raise ValueError("--devices: expected a list such as 0,1,2,3")
        for d in listed:
            if not (d.isdigit() or d.startswith(("GPU-", "MIG-"))):
                raise ValueError(f"--devices: {d!r} is not a CUDA device index or GPU-/MIG- UUID")
        if len(set(listed)) != len(listed):
            raise ValueError(f"--devices: {devices!r} names a device twice (one worker per GPU)")
        if mode == "live" and cuda_count:
            missing = [d for d in listed if d.isdigit() and int(d) >= cuda_count]
            if missing:
                raise ValueError(f"--devices: no CUDA device {', '.join(missing)} here ({cuda_count} visible)")
    if workers is not None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        if listed is not None and workers != len(listed):
            raise ValueError(f"--workers {workers} but --devices lists {len(listed)} devices (one worker per device)")
    if listed is not None:
        return listed  # even one listed device runs in a worker, so that it sees only that GPU
    if workers is None or workers == 1:
        return None
    if mode == "live":
        if workers > cuda_count:
            raise ValueError(f"--workers {workers}: live mode runs one worker per GPU and {cuda_count} are visible "
                             "(use --mode predict for CPU workers)")
        return [str(i) for i in range(workers)]
    return [None] * workers


def is_shared_storage(url: str) -> bool:
    """Storages that several processes (hosts) may write at once: heartbeats are on by default there."""
    return url.startswith("journal:") or url.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql")


# ----------------------------------------------------------------------------- journal heartbeat

class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """JournalStorage with optuna's heartbeat protocol, which Optuna 5 implements for RDBStorage only.

    The heartbeat is a trial system attr (wall-clock seconds; a journal file lives on one host, so
    its processes share a clock). A RUNNING trial is stale when neither its last heartbeat nor its
    start is within the grace period: the start covers the moment between popping a trial and its
    first heartbeat, and a retry, which inherits the failed trial's system attrs (and so an old
    heartbeat), starts afresh.
    """

    def __init__(self, backend, heartbeat_interval: int, grace_period: int, stale_trial_callback=None):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it as stale meanwhile; the trial's own tell will say so

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            seen = [trial.system_attrs.get(HEARTBEAT_ATTR) or 0.0]
            if trial.datetime_start is not None:
                seen.append(trial.datetime_start.timestamp())
            if now - max(seen) > self._grace_period:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_trial_callback

    def get_failed_trial_callback(self):  # the pre-4.9 name of the same hook
        return self._stale_trial_callback


# ----------------------------------------------------------------------------- worker process

class _Shared:
    """What the parent and its workers share: trial tickets, and per worker slot the trial in flight."""

    def __init__(self, ctx, tickets: int, slots: int):
        self.tickets = ctx.Value("q", tickets)  # its lock guards every field here
        self.done = ctx.Value("q", 0, lock=False)  # trials this run's workers ran to an end
        self.holding = ctx.Array("b", slots, lock=False)  # 1 while the slot's worker holds a ticket
        self.current = ctx.Array("q", [-1] * slots, lock=False)  # trial_id the slot's worker runs, -1 none

    @property
    def lock(self):
        return self.tickets.get_lock()


class _TrialSleep:
    """AUTOTUNE_TRIAL_SLEEP: pause before the accuracy check, i.e. after the params are set."""

    def __init__(self, accuracy, seconds: float, mark):
        self.accuracy, self.seconds, self.mark = accuracy, seconds, mark

    def __call__(self, config):
        self.mark()
        time.sleep(self.seconds)
        return self.accuracy(config)


class _WorkerObjective:
    """Records which process runs each trial (shared memory for the parent, a system attr for people)."""

    def __init__(self, objective, shared: _Shared, slot: int, tag: dict):
        self.objective, self.shared, self.slot, self.tag = objective, shared, slot, tag
        self.trial_id = -1
        self.storage = None
        sleep_s = float(os.environ.get(SLEEP_ENV) or 0)
        if sleep_s > 0:
            objective.accuracy = _TrialSleep(objective.accuracy, sleep_s, self._mark_sleep)

    def _mark_sleep(self) -> None:
        self.storage.set_trial_system_attr(self.trial_id, SLEEP_ATTR, time.time())

    def __call__(self, trial):
        self.trial_id, self.storage = trial._trial_id, trial.storage
        with self.shared.lock:
            self.shared.current[self.slot] = trial._trial_id
        trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.tag)
        return self.objective(trial)


class _WorkerProgress:
    def __init__(self, label: str, shared: _Shared, total: int):
        self.label, self.shared, self.total = label, shared, total

    def __call__(self, study, trial) -> None:
        with self.shared.lock:
            self.shared.done.value += 1
            done = self.shared.done.value
        what = trial.state.name.lower()
        if trial.state == TrialState.COMPLETE and trial.values:
            what += f" {trial.values[0]:.4f} ms" + ("" if _feasible(trial) else " (over the error budget)")
        retry = trial.system_attrs.get("failed_trial")
        if retry is not None:
            what += f", retry of trial {retry}"
        print(f"  [{self.label}] trial {trial.number} {what}  ({done}/{self.total})", flush=True)


def _feasible(trial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraint", [1.0]))


def _worker_main(slot: int, index: int, device: str | None, args, target: dict, shared: _Shared) -> None:
    """Entry point of a spawned worker (see run_workers)."""
    if device is not None:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so that indices mean what nvidia-smi and NVML say
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        code = _worker(slot, index, device, args, target, shared)
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    # everything is in the storage and the shared counters: skip the interpreter's teardown of torch
    # and friends (seconds per worker), which the parent would otherwise wait for
    os._exit(code)


def _worker(slot: int, index: int, device: str | None, args, target: dict, shared: _Shared) -> int:
    from .cli import build_objective, resolve_target
    from .export import mask_url
    from .objective import workload_from_spec
    from .study import StorageError, make_sampler, open_storage

    from roofline import CalibrationWarning

    warnings.simplefilter("ignore", CalibrationWarning)  # the parent has said it once already
    label = f"worker {index}" + (f" gpu {device}" if device is not None else "")
    try:
        gpu, model, _ = resolve_target(args)
        workload = workload_from_spec(model, args.workload)
        storage = open_storage(target["storage_url"], target["heartbeat"], target["grace"])
        seed = None if args.seed is None else args.seed + 1 + index  # distinct draws per worker
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=target["study_name"], storage=storage,
                                  sampler=make_sampler(args.objective, seed))
        objective = build_objective(args, gpu, model, target["mode"], workload,
                                    telemetry_index=int(device) if device is not None and device.isdigit() else 0)
    except (StorageError, ValueError, KeyError) as exc:
        print(f"error: {label}: {mask_url(str(exc))}", file=sys.stderr, flush=True)
        return 2
    tag = {"host": socket.gethostname(), "pid": os.getpid(), "worker": index, "device": device}
    wrapped = _WorkerObjective(objective, shared, slot, tag)
    progress = _WorkerProgress(label, shared, target["trials"])
    deadline = target["deadline"]  # wall clock, the same for the parent and every worker it starts
    try:
        while True:
            with shared.lock:
                if shared.tickets.value <= 0 or (deadline is not None and time.time() >= deadline):
                    return 0
                shared.tickets.value -= 1
                shared.current[slot] = -1
                shared.holding[slot] = 1
            # catch: a config that raises is a failed trial, not a dead worker
            study.optimize(wrapped, n_trials=1, callbacks=[progress], catch=(Exception,),
                           gc_after_trial=target["mode"] == "live")
            with shared.lock:
                shared.holding[slot] = 0
                shared.current[slot] = -1
    finally:
        engine = getattr(storage, "engine", None)  # RDBStorage: close its connections properly
        if engine is not None:
            engine.dispose()


# ----------------------------------------------------------------------------- parent

def run_workers(args, devices: list[str | None], *, study, storage: BaseStorage, storage_url: str, study_name: str,
                mode: str, heartbeat: int, grace: int, out=sys.stdout) -> str | None:
    """Run args.trials trials on `study` in len(devices) spawned workers; None when done, else a
    one-line reason why the count was not reached (the trials that ran stay in the study)."""
    import multiprocessing as mp

    from .study import MAX_RETRY

    ctx = mp.get_context("spawn")  # never fork a process that has imported torch (and maybe CUDA)
    slots = len(devices)
    shared = _Shared(ctx, args.trials, slots)
    target = {"storage_url": storage_url, "study_name": study_name, "mode": mode, "heartbeat": heartbeat,
              "grace": grace, "trials": args.trials,
              "deadline": time.time() + args.timeout if args.timeout else None}  # --timeout: no trial starts after it
    procs: dict[int, Any] = {}
    spawned = 0
    respawns_left = max(4, 2 * slots)  # a config that kills its worker is retried MAX_RETRY times, then counted
    pending: dict[int, dict] = {}  # trial_id of a dead worker's trial -> {label, failed_at}, until retried
    errors: list[str] = []

    def spawn(slot: int) -> None:
        nonlocal spawned
        proc = ctx.Process(target=_worker_main, args=(slot, spawned, devices[slot], args, target, shared),
                           name=f"autotune-worker-{spawned}", daemon=False)
        proc.start()
        procs[slot] = (proc, spawned)
        spawned += 1

    def refund() -> None:
        with shared.lock:
            shared.tickets.value += 1

    def reclaim(slot: int, proc, index: int) -> None:
        """The slot's worker is gone: give back its ticket unless its trial ended."""
        with shared.lock:
            holding, trial_id = shared.holding[slot], shared.current[slot]
            shared.holding[slot], shared.current[slot] = 0, -1
        how = f"killed by signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit code {proc.exitcode}"
        label = f"worker {index} (pid {proc.pid}" + (f", gpu {devices[slot]}" if devices[slot] is not None else "") + ")"
        if not holding:
            print(f"  {label} stopped ({how}) between trials", file=out, flush=True)
            return
        if trial_id < 0:  # between taking a ticket and starting its trial
            print(f"  {label} stopped ({how}) before its trial started; its turn goes to another worker",
                  file=out, flush=True)
            refund()
            return
        trial = storage.get_trial(trial_id)
        if trial.state in FINISHED:
            print(f"  {label} stopped ({how}) after trial {trial.number} ended", file=out, flush=True)
            return
        pending[trial_id] = {"label": label, "failed_at": None}
        print(f"  {label} died ({how}) during trial {trial.number}: it is failed after the {grace} s heartbeat "
              "grace period and retried", file=out, flush=True)

    def resolve_pending() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # also run by every worker before each trial
        for trial_id, info in list(pending.items()):
            trial = storage.get_trial(trial_id)
            if trial.state == TrialState.RUNNING:
                continue  # not stale yet
            history = trial.system_attrs.get("retry_history", [])
            if trial.state != TrialState.FAIL or len(history) + 1 > MAX_RETRY:
                del pending[trial_id]
                print(f"  trial {trial.number} of {info['label']} ended {trial.state.name}"
                      + (f" after {MAX_RETRY} retries: counted as failed" if trial.state == TrialState.FAIL else ""),
                      file=out, flush=True)
                continue
            retry = [t for t in study.get_trials(deepcopy=False)
                     if (t.system_attrs.get("retry_history") or [None])[-1] == trial.number]
            info["failed_at"] = info["failed_at"] or time.monotonic()
            if not retry and time.monotonic() - info["failed_at"] < RETRY_WAIT_S:
                continue  # failed a moment ago; the retry callback is about to queue it
            del pending[trial_id]
            refund()
            print(f"  trial {trial.number} failed (its worker died); "
                  + (f"retried as trial {retry[0].number}" if retry else "no retry was queued: a new trial runs instead"),
                  file=out, flush=True)

    for slot in range(slots):
        spawn(slot)
    try:
        while procs or pending:
            time.sleep(POLL_S)
            for slot, (proc, index) in list(procs.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del procs[slot]
                if proc.exitcode == 0:
                    continue
                reclaim(slot, proc, index)
                if proc.exitcode > 0:
                    errors.append(f"worker {index} exited with code {proc.exitcode}")
            if pending:
                resolve_pending()
            with shared.lock:
                left = shared.tickets.value
            timed_out = target["deadline"] is not None and time.time() >= target["deadline"]
            if left > 0 and not errors and not timed_out:
                for slot in range(slots):
                    if slot in procs or left <= 0:
                        continue
                    if respawns_left <= 0:
                        errors.append("workers kept dying; no replacement started")
                        break
                    respawns_left -= 1
                    print(f"  starting a replacement worker ({left} trial{'s' if left > 1 else ''} to go)",
                          file=out, flush=True)
                    spawn(slot)
                    left -= 1
            if errors and not procs:
                break
    except BaseException:  # Ctrl-C (the workers got it too) or a storage error: never leave orphans
        for proc, _ in procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        raise
    with shared.lock:
        left, done = shared.tickets.value, shared.done.value
    if left > 0 and not errors and target["deadline"] is not None and time.time() >= target["deadline"]:
        print(f"  --timeout reached: {done} of {args.trials} trials ran", file=out, flush=True)
        return None
    if left > 0:
        why = "; ".join(errors) or "stopped"
        return f"{why}: {done} of {args.trials} trials ran (they stay in the study; rerun to add more)"
    for error in errors:  # the others ran every trial
        print(f"  note: {error}", file=out, flush=True)
    return None


def summarize(study, since: int) -> str:
    """One line on the trials numbered >= since: states, queued ones and retries."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.number >= since]
    counts = {s: sum(t.state == s for t in trials) for s in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)}
    text = ", ".join(f"{n} {s.name.lower()}" for s, n in counts.items() if n and s != TrialState.WAITING) or "no trials"
    if counts[TrialState.WAITING]:
        text += f", {counts[TrialState.WAITING]} queued for a later run"
    retried = sum("failed_trial" in t.system_attrs for t in trials)
    return text + (f"; {retried} retr{'ies' if retried > 1 else 'y'} of trials whose worker died" if retried else "")
