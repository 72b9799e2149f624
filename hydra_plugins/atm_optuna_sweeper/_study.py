"""Storage and concurrency of the ``atm_optuna`` sweeper: the study, its heartbeat and its global trial budget.

Several workers (processes, machines) may share one RDB storage. :func:`open_study` creates or loads the study
(table creation under a lock); :func:`ask_within_budget` hands out trials under a lock in the storage's
database (:mod:`atm.sweeps.locks`) so that the workers together never exceed the budget; :class:`Heartbeat`
keeps this worker's running trials alive, and a trial whose worker died is failed and retried with the same
params (:func:`retry_callback`, :func:`fail_interrupted`).
"""

import logging
import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import optuna
from optuna.trial import TrialState

from atm.sweeps import RUN_ATTR, WORKER_ATTR
from atm.sweeps.locks import absolute_url, storage_lock
from atm.sweeps.pruners import SweepError

log = logging.getLogger(__name__)


def first_line(e: BaseException) -> str:
    """``<exception type>: <first line of its message>`` (the type alone for an empty message)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def normalize_storage(url: Optional[str]) -> Optional[str]:
    """The storage URL with an absolute SQLite path (a relative one is taken from the launch directory).

    Raises:
        SweepError: naming ``hydra.sweeper.storage``, for a URL SQLAlchemy cannot parse.
    """
    try:
        return absolute_url(url)  # what the report hook (atm.sweeps.report) computes from the same setting
    except Exception as e:
        raise SweepError(f"hydra.sweeper.storage: bad URL {url!r}: {e}") from None


def safe_url(url: Optional[str]) -> str:
    """The storage URL for messages: password hidden; ``in-memory`` for None."""
    if url is None:
        return "in-memory"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


#: Top-level packages whose exceptions are database or driver failures (store initialisation, a lost connection,
#: a lock timeout): a trial that fails with one before its stage started is retried (:func:`infrastructure_failure`).
_INFRA_PACKAGES = ("sqlalchemy", "alembic", "sqlite3", "psycopg2", "psycopg", "pymysql", "MySQLdb")


def infrastructure_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure of the infrastructure rather than of the recipe: ``err`` or an exception it
    was raised from (``__cause__``, or ``__context__`` unless suppressed) is a database/driver error
    (:data:`_INFRA_PACKAGES`), Optuna's ``StorageInternalError``, a ``ConnectionError`` or a ``TimeoutError``.

    An ``AtmError`` about the config is raised ``from None`` or with no cause: not an infrastructure failure;
    one wrapping a store error (``tracking store ... is not usable``) is.
    """
    seen: set = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__module__.split(".")[0] in _INFRA_PACKAGES or isinstance(
            e, (ConnectionError, TimeoutError, optuna.exceptions.StorageInternalError)
        ):
            return True
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return False


def worker_name() -> str:
    """This worker, as ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Records a heartbeat every ``interval`` seconds for the trials this worker runs (Optuna's
    heartbeat is driven by ``study.optimize``; the ask/tell sweeper drives it itself).

    Args:
        storage: the study's ``RDBStorage`` (created with a heartbeat interval).
        interval: seconds between two heartbeats.
    """

    def __init__(self, storage: Any, interval: int) -> None:
        self.storage, self.interval = storage, interval
        self.ids: set = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a lost connection must not kill the sweep
                    log.warning(f"heartbeat of trial id {trial_id} failed: {first_line(e)}")

    def add(self, trial_ids: Sequence[int]) -> None:
        """Start beating for these trial ids."""
        with self.lock:
            self.ids.update(trial_ids)

    def discard(self, trial_ids: Sequence[int]) -> None:
        """Stop beating for these trial ids (their jobs are done)."""
        with self.lock:
            self.ids.difference_update(trial_ids)

    def stop(self) -> None:
        """End the heartbeat thread (at its next wake-up)."""
        self.stopped.set()


def retry_callback(max_retry: Optional[int]) -> Optional[Any]:
    """Optuna's ``RetryHeartbeatStaleTrialCallback`` (same params, up to ``max_retry`` times; None: forever),
    or None for ``max_retry`` 0 (no retry)."""
    if max_retry is not None and max_retry == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def open_study(
    url: Optional[str],
    name: str,
    directions: List[str],
    *,
    load_if_exists: bool,
    heartbeat_interval: Optional[int],
    grace_period: Optional[int],
    max_retry: Optional[int],
) -> optuna.Study:
    """Create or load study ``name`` in storage ``url`` (None: in memory), with the heartbeat settings.

    Raises:
        SweepError: the storage cannot be opened, the study exists and ``load_if_exists`` is false, or it
            exists with other directions.
    """
    heartbeat: Dict[str, Any] = {}
    if url is not None and heartbeat_interval:
        heartbeat = dict(
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry_callback(max_retry),
        )
    try:
        # one worker at a time creates the tables of a fresh database (several start together); a client
        # outside the sweeper (optuna-dashboard, a script) may still race on them: retry a few times
        for attempt in range(5):
            try:
                with warnings.catch_warnings(), storage_lock(url, "atm_optuna/init"):
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    storage = None if url is None else optuna.storages.RDBStorage(url, **heartbeat)
                break
            except Exception as e:
                if attempt == 4 or "IntegrityError" not in f"{type(e).__name__} {e} {e.__cause__}":
                    raise
                time.sleep(0.5 * (attempt + 1))
    except Exception as e:
        why = first_line(e)
        cause = e.__cause__
        if cause is not None and str(cause).strip().split("\n")[0] not in why:
            why += f" ({first_line(cause)})"
        where = safe_url(url)
        raise SweepError(f"hydra.sweeper.storage: cannot open {where}: {why}") from None
    try:
        with storage_lock(url, "atm_optuna/init"):  # one worker creates the study, the others load it
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=directions,
                load_if_exists=load_if_exists,
            )
    except optuna.exceptions.DuplicatedStudyError:
        raise SweepError(
            f"hydra.sweeper.study_name: study {name!r} already exists in {safe_url(url)}"
            " (set load_if_exists: true to resume it)"
        ) from None
    have = [d.name.lower() for d in study.directions]
    if have != directions:
        raise SweepError(
            f"hydra.sweeper.direction: study {name!r} exists with directions {have},"
            f" config says {directions}"
        )
    return study


def ask_within_budget(
    study: optuna.Study,
    url: Optional[str],
    name: str,
    target: int,
    limit: int,
    heart: Optional[Heartbeat],
    reseed: Optional[Callable[[int], Any]],
) -> List[optuna.Trial]:
    """Up to ``limit`` trials within the global budget: first the WAITING ones (retries of
    failed or interrupted trials, enqueued trials), then new ones while COMPLETE + PRUNED +
    RUNNING + WAITING < ``target``. Stale trials (dead workers) are failed first. Counting
    and asking happen under one lock, so that concurrent workers never exceed the budget.

    Args:
        reseed: ``n -> sampler`` seeded for the study's ``n``-th trial, set before each ask; None keeps the
            study's sampler (the grid sampler picks unvisited grid points itself).
        heart: gets the new trials' ids.
    """
    with storage_lock(url, f"atm_optuna/budget/{name}"), warnings.catch_warnings():
        # Optuna warns that its heartbeat is meant for study.optimize: this loop drives it itself
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        n_waiting = sum(t.state == TrialState.WAITING for t in trials)
        n_live = sum(t.state in live for t in trials)
        n = min(limit, n_waiting + max(0, target - n_live))
        asked = []
        for i in range(n):
            # seeded by the number of trials so far: reproducible for one worker, and two
            # workers never sample with the same seed
            if reseed is not None:
                study.sampler = reseed(len(trials) + i)
            trial = study.ask()
            trial.set_user_attr(WORKER_ATTR, worker_name())
            if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
                study._storage.record_heartbeat(trial._trial_id)  # stale from now on unless renewed
            if heart is not None:
                heart.add([trial._trial_id])
            asked.append(trial)
        return asked


def stage_started(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether the job of ``trial`` attached an MLflow run to it (:func:`atm.sweeps.attach`, just before the stage
    runs): the trial has a ``mlflow_run_id`` user attribute other than the one a retry inherits from the trial
    it repeats."""
    frozen = study._storage.get_trial(trial._trial_id)
    run_id = frozen.user_attrs.get(RUN_ATTR)
    history = frozen.system_attrs.get("retry_history") or []
    if not run_id or not history:
        return bool(run_id)
    previous = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, history[-1])
    return study._storage.get_trial(previous).user_attrs.get(RUN_ATTR) != run_id


def retry_failed(study: optuna.Study, trial: optuna.Trial, max_retry: Optional[int]) -> Optional[int]:
    """Fail ``trial`` and enqueue its retry with the same params, as for a trial whose worker died (Optuna's
    ``RetryHeartbeatStaleTrialCallback``: system attrs ``failed_trial``, ``retry_history``); at most
    ``max_retry`` retries of one original trial (None: 3, so that a store that stays broken ends the sweep).

    Returns:
        the number of retries the original trial had before this one, or None when none was enqueued (the
        limit reached, or ``max_retry`` 0).
    """
    frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    limit = 3 if max_retry is None else max_retry
    history = frozen.system_attrs.get("retry_history", [])
    if frozen.state != TrialState.FAIL or len(history) >= limit:
        return None
    callback = retry_callback(limit)
    if callback is None:
        return None
    callback(study, frozen)
    return len(history)


def fail_interrupted(study: optuna.Study, trials: Sequence[optuna.Trial], callback: Optional[Any]) -> None:
    """The launcher raised (Ctrl-C, a dead job process): fail the trials and, as for a dead
    worker, enqueue their retries through ``callback`` (:func:`retry_callback`; None: no retry) so that
    re-running the command continues them."""
    for t in trials:
        try:
            frozen = study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
            if callback is not None and frozen.state == TrialState.FAIL:
                callback(study, frozen)
        except Exception as e:  # keep the original exception
            log.warning(f"could not record interrupted trial #{t.number}: {first_line(e)}")
