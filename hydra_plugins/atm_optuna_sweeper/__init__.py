"""``atm_optuna``: a small Hydra sweeper on current Optuna (ask/tell, RDB storage on SQLAlchemy 2).

It replaces ``hydra-optuna-sweeper`` (pinned to optuna<3) and keeps Hydra's sweep syntax.

Config (``hydra/sweeper: atm_optuna``)::

    defaults:
      - _self_
      - override hydra/sweeper: atm_optuna
    hydra:
      sweeper:
        study_name: distill_sweep        # default: hydra.job.name
        storage: sqlite:///optuna.db     # default; relative SQLite paths -> launch directory
        direction: minimize              # or maximize, or a list for multi-objective
        objectives: null                 # multi-objective: one metric name per direction (-> jobs)
        n_trials: 40                     # target number of finished trials in the study
        n_jobs: 1                        # trials per launcher batch
        load_if_exists: true             # resume the study if it exists
        sampler: {name: tpe, seed: 0, n_startup_trials: 10}   # tpe | random | grid (+ kwargs)
        pruner: {name: median, report_every: 50, n_startup_trials: 5}   # none | median | percentile |
                                         # successive_halving | hyperband | threshold (+ kwargs)
        heartbeat_interval: 10           # seconds; null: no heartbeat (no retry of dead workers' trials)
        grace_period: 30                 # a RUNNING trial without heartbeat this long is failed ...
        max_retry: 2                     # ... and retried with the same params (null: forever; 0: never)
        report: atm.sweeps.report:report # module:function(study=, sweep_dir=, config=) at the end; null
        params:
          distill.logit_loss: choice(soft_ce, kl, mse)
          distill.temperature: interval(1.0, 8.0)
          distill.weights.hidden: tag(log, interval(0.01, 1.0))
          trainer.lr: choice(1e-4, 3e-4)
          x: range(1, 5)
          distill.intermediate.loss: choice(hidden_mse, pkd, infonce, mi_alpha)
          +distill.intermediate.options.alpha:           # conditional (define-by-run) param
            when: {distill.intermediate.loss: mi_alpha}
            space: interval(0.0, 1.0)

Search-space syntax (in ``params`` or on the command line, ``python app.py -m x=choice(1,2)``):

* ``choice(a, b, ...)`` and plain lists ``a,b`` -> categorical.
* ``range(start, stop[, step])`` -> int with Python semantics (``range(1, 5)`` = 1..4); a
  non-integer range becomes a categorical over its values. ``tag(log, range(1, 100))`` -> log int.
* ``interval(low, high)`` -> float; int if both ends are written as integers (``interval(1, 8)``);
  ``tag(log, interval(...))`` -> log scale; ``tag(int, interval(...))`` -> int.
* Any other override (``trainer.epochs=3``, ``~foo``) is passed unchanged to every job; a
  command-line entry for a key replaces the ``params`` entry of that key (in its position).
* Keys may carry Hydra's ``+``/``++`` prefix, in ``params`` or on the command line
  (``+a.b: choice(1, 2)``, ``-m +a.b=choice(1,2)``) for keys missing from the app config: the job
  gets ``+a.b=<value>``, the Optuna param (and ``best_params``) is named ``a.b``. The pre-flight
  composition check applies the prefix too (without it a missing key is an error).
* An empty search space is allowed (define-by-run: jobs call ``trial.suggest_*`` themselves).
* New sampler kwargs on the command line need a ``+``:
  ``+hydra.sweeper.sampler.n_startup_trials=5``.
* Storage: with SQLAlchemy 2.1 a bare ``postgresql://`` URL means psycopg 3; write
  ``postgresql+psycopg2://user@host:5432/db`` to use psycopg2.

Conditional params (Optuna define-by-run): a ``params`` entry may be a mapping with ``space``
(a sweep string as above) and ``when`` (param -> value, or a list of values meaning any of
them; several params: all must hold)::

    params:
      distill.intermediate.loss: choice(hidden_mse, pkd, infonce, mi_alpha)
      augment.name: choice(none, random_replace, mask, contextual, repeated)
      +distill.intermediate.options.alpha:
        when: {distill.intermediate.loss: mi_alpha}
        space: interval(0.0, 1.0)
      augment.probability:
        when: {augment.name: [random_replace, mask, contextual, repeated]}
        space: interval(0.05, 0.5)

* Params are sampled in the order written; a ``when`` may refer only to params written before it
  (possibly conditional themselves: an inactive param fails every condition on it). A param
  whose condition is false is not suggested to Optuna (``trial.suggest_*`` is not called, so the
  trial simply lacks it and TPE models the conditional space) and is not passed to the job,
  which keeps its config default.
* Values are compared as numbers when both read as numbers (``choice(1, 2)`` sampled ``1``
  matches ``when: {x: 1}`` and ``when: {x: "1"}``), else as text (``true``/``false``/``null``).
  A condition on a float ``interval`` holds only on an exact match (a warning says so).
* A command-line sweep of a conditional key replaces its ``space`` and keeps its ``when``; a
  fixed command-line value of a conditional key is passed to every job. A ``when`` on a key
  that has a fixed value (``-m augment.name=mask``) is decided once: true -> that part of the
  condition is dropped; false -> the param is never sampled (warning).
* The pre-flight composition check tries every choice of a conditional param with its
  condition made true. The grid sampler does not support conditional params.
* Errors (before any job): a key under the mapping other than ``when``/``space``; a missing or
  non-sweep ``space``; a ``when`` naming the param itself, a param written after it, or a key
  not in ``params`` (nor fixed on the command line); a ``when`` value that a ``choice()`` or an
  int ``range()``/``interval()`` can never take; conditions that contradict each other through
  a chain of conditional params.

Sweep loop: the study is created or loaded; the sweeper runs at most ``n_trials - finished``
trials (finished = COMPLETE or PRUNED trials already in the study), ``n_jobs`` per launcher batch,
asking Optuna for each trial and telling it the job's return value (a float, or a sequence of floats
for a multi-objective study). A job that raises is recorded FAIL (``optuna.TrialPruned`` -> PRUNED)
and the sweep goes on; a job returning None, NaN or a non-number is recorded FAIL with a warning.
If *every* trial of the run fails, the sweep ends with an error (non-zero exit). With a ``seed``,
the sampler is seeded with ``seed + number of trials in the study`` before each ask, so that a
resumed random/TPE sweep does not replay the same samples and two workers never sample alike. At
the end ``optimization_results.yaml`` (best trial number, value, params) is written to the sweep
dir, the best trial is logged, and the ``report`` hook runs (atm's: plots, trials CSV, Pareto
front, logged on the MLflow parent run; a failing report only warns).

Several workers (the same command in several processes or on several machines, one RDB storage)
share the study and its budget: under a lock in the storage's database (PostgreSQL advisory lock,
SQLite file lock; :mod:`atm.sweeps.locks`) a worker first fails stale trials, then asks for the
WAITING trials (retries) and for new ones only while COMPLETE + PRUNED + RUNNING + WAITING <
``n_trials``; once the budget is used up it waits for the others' RUNNING trials, so that the trial
of a dead worker is failed by heartbeat, retried (``RetryHeartbeatStaleTrialCallback``: same params,
system attrs ``failed_trial``/``retry_history``) and finished by a live one. A trial interrupted by an
exception in the launcher (Ctrl-C) is recorded FAIL and enqueued for retry the same way, so re-running
the command continues it. Each trial gets the user attr ``worker`` (``host:pid``); the study the user
attr ``atm_optuna.pruner`` (the pruner spec, read by jobs).

Job contract: every job receives, besides its parameter overrides, ::

    ++optuna.study_name='<study name>'
    ++optuna.storage='<absolute storage URL>'     (null for an in-memory study)
    ++optuna.trial_number=<n>

so ``cfg.optuna.trial_number`` is the job's Optuna trial. A job reports intermediate values
through the live trial::

    from atm.sweeps import trial_from_config
    trial = trial_from_config(cfg)          # None when not running under this sweeper
    if trial is not None:
        trial.report(dev_loss, step=epoch)
        if trial.should_prune():            # Optuna's default MedianPruner
            raise optuna.TrialPruned()

which is ``optuna.load_study(study_name=..., storage=...)`` plus ``optuna.Trial(study, trial_id)``
with the id looked up from the trial number; ``study.pruner`` is the sweep's pruner and
``atm.sweeps.report_every(trial)`` its ``report_every`` (atm's stages do all this through
:func:`atm.sweeps.pruning_callbacks`). The job must still *return* its objective (with
``objectives`` set, it also receives ``++optuna.objectives=[...]`` and returns one value each). Job dirs
are numbered from the trial number (``hydra.job.num``). Exclude ``optuna.*`` from
``hydra.job.config.override_dirname`` if you use it in paths. Note that a password in the storage
URL reaches each job's ``.hydra/overrides.yaml``; prefer ``~/.pgpass`` or trust auth.

Errors (raised before any job starts, as :class:`atm.errors.AtmError` with a one-line message
naming the key; Hydra prints it and exits 1): unknown sampler name or bad sampler kwargs, bad
``direction``/``n_trials``/``n_jobs``, unparseable sweep string, empty ``choice()``/``range()``,
``interval(low, high)`` with low > high, log scale with low <= 0, grid sampler over a continuous
param or with conditional params, bad conditional params (see above), params that do not compose
with the app config, unknown pruner or bad pruner kwargs, a pruner without ``report_every`` or on
a multi-objective study, ``objectives`` not matching ``direction``, bad heartbeat settings
(``grace_period`` <= ``heartbeat_interval``), unreachable storage, an existing study
with another direction, or an existing study with ``load_if_exists: false``.

Layout: ``config.py`` (the schema, registered with Hydra) and ``atm_optuna_sweeper.py`` (the plugin class)
are all Hydra's plugin scan imports; the sweep itself lives in modules whose names start with ``_`` (the
scan skips them, so Optuna and SQLAlchemy are imported only when a sweep runs): ``_space`` (the search-space
language), ``_validation`` (the settings and their checks, the sampler), ``_study`` (storage, heartbeat,
global trial budget) and ``_sweeper`` (the ask/launch/tell loop and its reports). The plugin imports
:mod:`atm.sweeps` (the job side: :func:`atm.sweeps.trial_from_config`, the pruner and
:class:`~atm.sweeps.pruners.SweepError` in :mod:`atm.sweeps.pruners`, locks, report); atm never imports
the plugin.
"""
