"""In-process tests of the sweep parts: storage locks, the global trial budget under concurrent workers,
pruner specs, heartbeat retries, and the student cost metrics."""

from __future__ import annotations

import threading
import time
import uuid

import optuna
import pytest
import torch
from optuna.trial import TrialState

from atm.sweeps.locks import storage_lock
from atm.sweeps.pruners import SweepError, make_pruner
from hydra_plugins.atm_optuna_sweeper._sweeper import AtmOptunaSweeperImpl

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pg_reachable() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG).connect():
            return True
    except Exception:
        return False


def _urls(tmp_path):
    urls = [f"sqlite:///{tmp_path / 'optuna.db'}"]
    return urls + [PG] if _pg_reachable() else urls


def _intervals(url: str, keys: list[str]) -> list[tuple[float, float]]:
    """Each thread holds ``storage_lock(url, key)`` for 0.3 s; returns (enter, exit) times per thread."""
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(keys)

    def hold(i: int, key: str) -> None:
        with storage_lock(url, key):
            start = time.monotonic()
            time.sleep(0.3)
            out[i] = (start, time.monotonic())

    threads = [threading.Thread(target=hold, args=(i, k)) for i, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(out)


def test_storage_lock_is_exclusive_per_key(tmp_path):
    key = f"test/{uuid.uuid4().hex}"
    for url in _urls(tmp_path):
        same = _intervals(url, [key, key, key])
        assert all(a[1] <= b[0] for a, b in zip(same, same[1:])), url  # one after the other
        other = _intervals(url, [key, key + "/other"])
        assert other[1][0] < other[0][1], url  # different keys do not wait for each other


def test_budget_is_exact_with_concurrent_workers(tmp_path):
    """6 workers ask for trials at once on one SQLite study with a budget of 5: exactly 5 are created, and a
    retried (WAITING) trial is handed out even when the budget is used up."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweeper = AtmOptunaSweeperImpl(sampler={"name": "random", "seed": 0}, heartbeat_interval=None)
    optuna.create_study(study_name="budget", storage=url)
    asked: list[int] = []

    def worker() -> None:
        study = optuna.load_study(study_name="budget", storage=url)
        while True:
            trials = sweeper._ask(study, {}, url, "budget", target=5, limit=1, heart=None)
            if not trials:
                return
            asked.extend(t.number for t in trials)
            time.sleep(0.05)
            study.tell(trials[0], 1.0)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = optuna.load_study(study_name="budget", storage=url)
    assert sorted(asked) == [0, 1, 2, 3, 4] and len(study.trials) == 5
    study.enqueue_trial({})  # e.g. the retry of a trial whose worker died
    retry = sweeper._ask(study, {}, url, "budget", target=5, limit=3, heart=None)
    assert [t.number for t in retry] == [5] and study.trials[5].state == TrialState.RUNNING


def test_stale_trial_is_failed_and_retried_with_its_params(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweeper = AtmOptunaSweeperImpl(sampler={"name": "random", "seed": 0}, heartbeat_interval=1, grace_period=2)
    study = sweeper._open_study(url, "stale", ["minimize"])
    dead = sweeper._ask(study, {}, url, "stale", target=2, limit=1, heart=None)[0]
    dead.suggest_float("x", 0.0, 1.0)
    assert sweeper._ask(study, {}, url, "stale", target=1, limit=1, heart=None) == []  # budget: 1 running
    time.sleep(3.2)  # no heartbeat for longer than grace_period
    retry = sweeper._ask(study, {}, url, "stale", target=1, limit=1, heart=None)
    assert len(retry) == 1
    assert study.trials[dead.number].state == TrialState.FAIL
    frozen = study.trials[retry[0].number]
    assert frozen.system_attrs["failed_trial"] == dead.number and frozen.params == study.trials[dead.number].params
    assert retry[0].suggest_float("x", 0.0, 1.0) == study.trials[dead.number].params["x"]


def test_pruner_specs():
    pruner, every = make_pruner({"name": "median", "report_every": 10, "n_startup_trials": 3})
    assert isinstance(pruner, optuna.pruners.MedianPruner) and every == 10
    assert isinstance(make_pruner({"name": "hyperband", "report_every": 5})[0], optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner({"name": "successive_halving", "report_every": 5})[0],
                      optuna.pruners.SuccessiveHalvingPruner)
    assert make_pruner(None)[1] == 0 and isinstance(make_pruner(None)[0], optuna.pruners.NopPruner)
    # switching a pruner off by name keeps its kwargs around without error
    assert isinstance(make_pruner({"name": "none", "n_startup_trials": 3})[0], optuna.pruners.NopPruner)
    for spec, message in [({"name": "bogus"}, "unknown pruner 'bogus'"),
                          ({"name": "median"}, "needs jobs to report every N steps"),
                          ({"name": "median", "report_every": 5, "nope": 1}, "hydra.sweeper.pruner: "),
                          ({"name": "median", "report_every": -1}, "expected an int >= 0")]:
        with pytest.raises(SweepError, match=message):
            make_pruner(spec)
    with pytest.raises(SweepError, match="single-objective"):
        AtmOptunaSweeperImpl(pruner={"name": "median", "report_every": 5})._validate(["minimize", "minimize"])
    with pytest.raises(SweepError, match=r"objectives: 1 metric\(s\) for 2 direction"):
        AtmOptunaSweeperImpl(objectives=["a"])._validate(["minimize", "maximize"])
    with pytest.raises(SweepError, match="grace_period: 5 s must exceed heartbeat_interval"):
        AtmOptunaSweeperImpl(heartbeat_interval=5, grace_period=5)._validate(["minimize"])


class _Sleeper(torch.nn.Module):
    """A model whose forward pass takes 4 ms (plus a tiny linear layer with 3 x 2 + 2 parameters)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.calls = 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        time.sleep(0.004)
        return input_ids


def _tokenizer(text, truncation, max_length, return_tensors):
    ids = torch.arange(min(len(text.split()), max_length)).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_cpu_latency_is_the_median_of_timed_batch1_passes():
    from atm.models.cost import cpu_latency_ms

    model = _Sleeper().train()
    ms = cpu_latency_ms(model, _tokenizer, ["set an alarm", "play jazz"], runs=5, warmup=2)
    assert model.calls == 7  # 2 warm-up passes, 5 timed
    assert 4.0 <= ms < 40.0
    assert model.training  # left as it was


def test_parameter_counts_of_a_tiny_mlm():
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    from atm.models.cost import parameter_counts

    V, H, L, F, P = 100, 16, 2, 32, 20
    config = RobertaPreLayerNormConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
                                       intermediate_size=F, max_position_embeddings=P, type_vocab_size=1)
    counts = parameter_counts(RobertaPreLayerNormForMaskedLM(config))
    # by hand: embeddings V*H + P*H + 1*H (+ LayerNorm 2H); per layer 4(H*H+H) + 2(2H) + H*F+F + F*H+H;
    # final LayerNorm 2H; LM head dense H*H+H, LayerNorm 2H, decoder tied, bias V
    embeddings = V * H + P * H + H
    layer = 4 * (H * H + H) + 2 * 2 * H + (H * F + F) + (F * H + H)
    total = embeddings + 2 * H + L * layer + 2 * H + (H * H + H) + 2 * H + V
    assert counts == {"cost/parameters": total, "cost/non_embedding_parameters": total - embeddings - V}


def test_failed_trials_runs_are_closed_failed_whatever_the_worker_left(tmp_path, monkeypatch):
    """A worker killed mid-trial leaves its MLflow run RUNNING; one killed after ending its run but before
    telling Optuna leaves it FINISHED; Ctrl-C in the training loop ends it KILLED. Either way the trial is FAIL and
    its run must end FAILED; runs of COMPLETE trials and KILLED runs of pruned jobs are left as they are."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from atm.sweeps import RUN_ATTR, TAG_TRIAL_STATE, close_failed_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("closing")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="closing")
    cases = [("RUNNING", TrialState.FAIL, "FAILED"), ("FINISHED", TrialState.FAIL, "FAILED"),
             ("KILLED", TrialState.FAIL, "FAILED"), ("KILLED+PRUNED", TrialState.FAIL, "KILLED+PRUNED"),
             ("FINISHED", TrialState.COMPLETE, "FINISHED")]
    runs = []
    for status, state, _ in cases:
        run_id = client.create_run(exp).info.run_id
        if status == "KILLED+PRUNED":
            client.set_tag(run_id, TAG_TRIAL_STATE, "PRUNED")
            status = "KILLED"
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        trial = study.ask()
        trial.set_user_attr(RUN_ATTR, run_id)
        study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
        runs.append(run_id)
    closed = close_failed_runs(study.get_trials(deepcopy=False))
    assert closed == runs[:3]
    for run_id, (_, _, expected) in zip(runs, cases):
        run = client.get_run(run_id)
        assert run.info.status == expected.split("+")[0]
        assert (run.data.tags.get(TAG_TRIAL_STATE) == "FAIL") == (expected == "FAILED")
