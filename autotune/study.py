"""Optuna study handling: storage, sampler, warm start, the run with progress, and the final table.

Storage: an SQLite file under studies/ named by GPU and model by default (one process); any
SQLAlchemy URL (postgresql://... for several hosts); or journal:PATH (Optuna's journal file
backend, safe for several processes on one host). Rerunning the same command continues the same
study: `--trials N` adds N trials.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Any

from kernels.config import KernelConfig

from .export import mask_url
from .objective import Objective, constraints_func
from .space import config_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDIES_DIR = ROOT / "studies"
WARM_START_SAMPLES = 400  # random configs scored by the roofline model for the warm start
WARM_START_TOP = 4
MAX_RETRY = 3  # a trial whose worker died is retried this many times (optuna's RetryHeartbeatStaleTrialCallback)


class StorageError(ValueError):
    """A storage URL that cannot be used (one line, password masked)."""


def default_storage(gpu: str, model: str, journal: bool = False) -> str:
    """studies/<gpu>-<model>.db for one process; .journal (Optuna's journal file) for several workers."""
    STUDIES_DIR.mkdir(parents=True, exist_ok=True)
    if journal:
        return f"journal:{STUDIES_DIR / f'{gpu}-{model}.journal'}"
    return f"sqlite:///{STUDIES_DIR / f'{gpu}-{model}.db'}"


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage for `url`; raises StorageError with a one-line reason.

    With a heartbeat, a RUNNING trial whose process stopped beating for `grace_period` (default
    2 x heartbeat) is failed and retried (MAX_RETRY times) by the next worker that starts a trial.
    """
    import warnings

    import optuna
    from optuna.storages import RDBStorage

    retry = None
    if heartbeat_interval:
        with warnings.catch_warnings():  # experimental in Optuna; renamed in 4.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
                optuna.storages.RetryFailedTrialCallback
            retry = retry_cls(max_retry=MAX_RETRY)
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = pathlib.Path(url[len("journal:"):]).expanduser()
        if not path.parent.exists():
            raise StorageError(f"--storage: folder {path.parent} does not exist")
        try:
            backend = JournalFileBackend(str(path))
            if heartbeat_interval:  # Optuna 5's JournalStorage has no heartbeat of its own
                from .workers import HeartbeatJournalStorage

                return HeartbeatJournalStorage(backend, heartbeat_interval, grace_period or 2 * heartbeat_interval,
                                               retry)
            return JournalStorage(backend)
        except (OSError, ValueError) as exc:
            raise StorageError(f"--storage: cannot open {path}: {exc}") from None
    scheme = url.split(":", 1)[0]
    if scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(f"--storage: unsupported URL {mask_url(url)!r}; use sqlite:///FILE, "
                           "postgresql://USER:PASSWORD@HOST/DB or journal:FILE")
    kwargs: dict[str, Any] = {}
    if heartbeat_interval:
        import inspect

        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in \
            inspect.signature(RDBStorage).parameters else "failed_trial_callback"
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period or 2 * heartbeat_interval,
                      **{callback: retry})
    if scheme == "postgresql":
        url = "postgresql+" + _postgres_driver() + url[len("postgresql"):]
    if scheme.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        return _rdb_storage(url, kwargs)
    except ImportError as exc:
        raise StorageError(f"--storage: {mask_url(url)}: a driver is missing ({exc}); "
                           "for PostgreSQL install the extra: pip install -e '.[postgres]'") from None
    except Exception as exc:  # connection refused, bad credentials, unknown database, bad path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"--storage: cannot open {mask_url(url)}: {mask_url(first)[:200]}") from None


def _rdb_storage(url: str, kwargs: dict, attempts: int = 6):
    """RDBStorage(url), retried while another process creates the same tables: workers on several
    hosts starting on an empty database all run Optuna's CREATE TABLE / version insert, and the
    losers get a unique-key or duplicate-table error (connection errors are not retried)."""
    import random
    import warnings

    import optuna
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
                return RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError, OperationalError) as exc:
            orig = getattr(exc, "orig", None)
            sqlstate = str(getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None) or "")
            racing = not isinstance(exc, OperationalError) or sqlstate.startswith("40")  # 40P01: deadlock
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 + random.random() * 0.3 * (attempt + 1))
    raise AssertionError("unreachable")


def _postgres_driver() -> str:
    """SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; use whichever driver is installed."""
    import importlib.util

    return "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"


def make_sampler(objective: str, seed: int | None):
    """TPE (latency) or NSGA-II (pareto), constrained by the error budgets.

    Optuna >= 5 reads constraints that the objective sets on the trial (Trial.set_constraint);
    older versions take constraints_func.
    """
    import warnings

    import optuna

    kwargs = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": constraints_func}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if objective == "pareto":
            return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True, group=True, **kwargs)


def open_study(storage, name: str, objective: str, seed: int | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["minimize"] * (3 if objective == "pareto" else 1)
    try:
        return optuna.create_study(storage=storage, study_name=name, sampler=make_sampler(objective, seed),
                                   directions=directions, load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study with other directions
        raise StorageError(f"--study-name {name}: {exc}") from None


def claim_warm_start(storage, study_name: str) -> bool:
    """True for exactly one caller per study: the one that enqueues the warm start.

    Workers on several hosts may start together on a new study; enqueue_trial(skip_if_exists=True)
    reads, then writes, so both could enqueue (Optuna says so), and Optuna's storage API has no
    set-if-absent for an attribute. Creating a study is atomic in every backend (a unique name in
    the database, log order in a journal), so the claim is an empty marker study named after this
    study's id (a study deleted and created again under the same name gets a new id).
    """
    import optuna

    marker = f"{study_name}.warm-start.{storage.get_study_id_from_name(study_name)}"
    try:
        storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], marker)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def warm_start(study, objective: Objective, gpu: str, seed: int | None, other_docs=()) -> list[str]:
    """Enqueue the default config, the roofline's best predictions and winners exported for this
    model on other GPUs; only into a study with no trials yet. Returns what was enqueued."""
    import random

    import optuna

    from .objective import PredictTimer
    from .space import space_for, suggest_config

    kinds = objective.workload.kinds
    enqueued: list[str] = []
    seen = set()

    def enqueue(config: KernelConfig, why: str) -> None:
        params = config_params(config, kinds)
        key = tuple(sorted(params.items(), key=lambda kv: kv[0]))
        if key in seen:
            return
        seen.add(key)
        study.enqueue_trial(params, user_attrs={"warm_start": why}, skip_if_exists=True)
        enqueued.append(why)

    enqueue(KernelConfig(), "default config")
    for path, doc in other_docs:
        from kernels.loader import config_from_document

        enqueue(config_from_document(doc), f"exported winner {path.name}")
    # predict mode already holds a roofline timer (and its calibration): score with that one
    predictor = objective.timer if isinstance(objective.timer, PredictTimer) else PredictTimer(gpu)
    space = space_for(kinds)
    rng = random.Random(seed)
    scored = []
    for i in range(WARM_START_SAMPLES):
        config = suggest_config(optuna.trial.FixedTrial({p.name: rng.choice(p.choices) for p in space}), kinds)
        if not predictor.feasible(config, objective.workload)[0]:
            continue
        scored.append((objective.workload_ms(predictor, config), i, config))
    for ms, _, config in sorted(scored, key=lambda s: (s[0], s[1]))[:WARM_START_TOP]:
        enqueue(config, f"roofline prediction {ms:.3f} ms")
    return enqueued


@dataclass
class Progress:
    """A one-line progress bar with the best feasible value so far."""

    total: int
    stream: Any = sys.stdout
    width: int = 30
    done: int = 0
    start: float = 0.0

    def __call__(self, study, trial) -> None:
        self.done += 1
        if not self.start:
            self.start = time.time()
        from .export import best_trial

        best = best_trial(study)
        best_txt = f"best {best.values[0]:.4f} ms (trial {best.number})" if best else "no feasible trial yet"
        filled = int(self.width * min(self.done, self.total) / max(self.total, 1))
        state = trial.state.name.lower()
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"trial {trial.number} {state}; {best_txt}")
        end = "\r" if getattr(self.stream, "isatty", lambda: False)() and self.done < self.total else "\n"
        if end == "\n" and not getattr(self.stream, "isatty", lambda: False)() and self.done % 10 and self.done != self.total:
            return  # not a terminal: one line every 10 trials
        print(line.ljust(110), end=end, file=self.stream, flush=True)


def summary_table(rows: list[dict]) -> str:
    """Fixed-width text table of dict rows (first row's keys as columns)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)
