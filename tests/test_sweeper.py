"""Tests of the ``atm_optuna`` Hydra sweeper (hydra_plugins/atm_optuna_sweeper).

End-to-end tests run the toy app ``tests/sweeper_app/app.py`` in real subprocesses
(``python app.py -m ...``) with every output under ``tmp_path``; a few parser checks run in-process.
"""

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "sweeper_app" / "app.py"
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
HINT = "Set the environment variable HYDRA_FULL_ERROR=1"

if str(ROOT) not in sys.path:  # harmless once the repo is installed (editable)
    sys.path.insert(0, str(ROOT))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_app(
    tmp_path: Path, *overrides: str, config_name: str = "config"
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable, str(APP), f"--config-name={config_name}", "-m",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"marker_dir={tmp_path / 'markers'}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def sqlite_study(tmp_path: Path, name: str = "app") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def markers(tmp_path: Path) -> dict:
    return {
        int(p.stem): json.loads(p.read_text()) for p in (tmp_path / "markers").glob("*.json")
    }


def results(tmp_path: Path) -> dict:
    return yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())


def test_sweep_then_resume(tmp_path):
    proc = run_app(tmp_path)
    assert proc.returncode == 0, proc.stderr
    study = sqlite_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4

    # each job saw its trial number and reported through trial_from_config
    seen = markers(tmp_path)
    assert sorted(seen) == [0, 1, 2, 3]
    for t in study.trials:
        rec = seen[t.number]
        assert rec["helper_trial_number"] == t.number
        assert rec["x"] == pytest.approx(t.params["x"]) and rec["y"] == t.params["y"]
        assert t.value == pytest.approx(rec["value"])
        assert t.intermediate_values == {0: pytest.approx(rec["value"] + 1.0)}
        assert (tmp_path / "multirun" / str(t.number) / ".hydra" / "config.yaml").exists()

    res = results(tmp_path)
    assert res["best_trial"] == study.best_trial.number
    assert res["best_value"] == pytest.approx(study.best_value)
    assert res["best_params"] == study.best_params
    assert res["n_trials"]["complete"] == 4
    assert f"best trial #{study.best_trial.number} value=" in proc.stdout

    # same command, larger budget: only the 2 missing trials run, in the same study
    proc = run_app(tmp_path, "hydra.sweeper.n_trials=6")
    assert proc.returncode == 0, proc.stderr
    assert "4 finished trial(s), running 2 more" in proc.stdout
    study = sqlite_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert sorted(markers(tmp_path)) == [0, 1, 2, 3, 4, 5]
    assert results(tmp_path)["n_trials"]["complete"] == 6


def test_command_line_sweeps_and_plain_overrides(tmp_path):
    proc = run_app(tmp_path, "x=choice(0.5,1.5)", "y=b", "report=false", "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr
    study = sqlite_study(tmp_path)
    assert set(study.trials[0].distributions) == {"x"}  # y=b is fixed, not searched
    for t in study.trials:
        assert t.params["x"] in (0.5, 1.5) and t.intermediate_values == {}
    assert {rec["y"] for rec in markers(tmp_path).values()} == {"b"}


def test_grid_sampler_runs_the_whole_grid_once(tmp_path):
    proc = run_app(
        tmp_path, "hydra.sweeper.sampler.name=grid", "hydra.sweeper.params.x='range(0, 2)'",
        "y=a,b", "hydra.sweeper.n_trials=10",
    )
    assert proc.returncode == 0, proc.stderr
    study = sqlite_study(tmp_path)
    assert sorted((t.params["x"], t.params["y"]) for t in study.trials) == [
        (0, "a"), (0, "b"), (1, "a"), (1, "b")
    ]


def test_failed_jobs_are_recorded_and_the_sweep_continues(tmp_path):
    proc = run_app(tmp_path, "fail_on=[1]", "nan_on=[2]")
    assert proc.returncode == 0, proc.stderr
    states = [t.state for t in sqlite_study(tmp_path).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert "trial #1 failed (RuntimeError: boom in trial 1)" in proc.stdout
    assert "trial #2: the job returned NaN; recorded as FAIL" in proc.stdout
    assert results(tmp_path)["n_trials"]["fail"] == 2


def test_ctrl_c_inside_a_trial_stops_the_sweep_and_the_rerun_retries_it(tmp_path):
    """atm's training loop turns Ctrl-C into atm.errors.Interrupted, which Hydra's job runner reports as the job's
    failure: the sweep must stop there (not go on to the next trial), with the trial FAIL and its retry enqueued."""
    proc = run_app(tmp_path, "interrupt_on=[1]")
    assert proc.returncode != 0 and "interrupted at step 3 of trial 1" in proc.stderr
    study = sqlite_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert sorted(k for k in markers(tmp_path)) == [0, 1]  # trials 2 and 3 never started
    assert study.trials[2].system_attrs["failed_trial"] == 1 and study.trials[2].params == study.trials[1].params
    again = run_app(tmp_path, "interrupt_on=[1]")
    assert again.returncode == 0, again.stderr
    states = [t.state for t in sqlite_study(tmp_path).trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1


def test_sweep_where_every_trial_fails_exits_nonzero(tmp_path):
    proc = run_app(tmp_path, "fail_on=[0,1]", "hydra.sweeper.n_trials=2")
    assert proc.returncode != 0
    assert "all 2 trial(s) of this sweep failed; first: trial #0: RuntimeError" in proc.stderr
    assert [t.state for t in sqlite_study(tmp_path).trials] == [TrialState.FAIL] * 2


def test_conditional_and_prefixed_params(tmp_path):
    # conditional.yaml: mode: choice(plain, scaled, 1); +extra.alpha when mode=scaled;
    # +extra.beta when mode in [scaled, 1] and y=b; +extra.gamma: a +-prefixed command-line sweep
    proc = run_app(
        tmp_path, "hydra.sweeper.sampler.name=tpe", "+hydra.sweeper.sampler.n_startup_trials=3",
        "+extra.gamma=choice(3,4)", config_name="conditional",
    )
    assert proc.returncode == 0, proc.stderr
    study = sqlite_study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8
    seen = markers(tmp_path)
    n_alpha = n_beta = 0
    for t in study.trials:
        rec, p = seen[t.number], t.params
        alpha_on = p["mode"] == "scaled"
        beta_on = p["mode"] in ("scaled", 1) and p["y"] == "b"
        n_alpha, n_beta = n_alpha + alpha_on, n_beta + beta_on
        # sampled only when the condition held; otherwise neither sampled nor sent to the job
        assert ("extra.alpha" in p) == alpha_on and ("extra.beta" in p) == beta_on
        want = {"gamma"} | ({"alpha"} if alpha_on else set()) | ({"beta"} if beta_on else set())
        assert set(rec["extra"]) == want
        assert rec["mode"] == p["mode"] and rec["extra"]["gamma"] == p["extra.gamma"]
        if alpha_on:
            assert rec["extra"]["alpha"] == pytest.approx(p["extra.alpha"])
            assert t.distributions["extra.alpha"] == optuna.distributions.FloatDistribution(0, 1)
        if beta_on:
            assert rec["extra"]["beta"] == p["extra.beta"]
        assert t.value == pytest.approx(rec["value"])
        sent = yaml.safe_load(
            (tmp_path / "multirun" / str(t.number) / ".hydra" / "overrides.yaml").read_text()
        )
        assert [o.split("=")[0] for o in sent if "extra" in o] == (
            ["+extra.alpha"] * alpha_on + ["+extra.beta"] * beta_on + ["+extra.gamma"]
        )
    assert 0 < n_alpha < 8 and 0 < n_beta < 8  # both branches of both conditions ran
    assert "extra.gamma" in results(tmp_path)["best_params"]


BAD_CONFIGS = [
    ("hydra.sweeper.sampler.name=bogus", "hydra.sweeper.sampler.name: unknown sampler 'bogus'"),
    ("hydra.sweeper.params.y='choice()'", "hydra.sweeper.params.y: cannot parse"),
    ("hydra.sweeper.params.x='interval(5.0, 1.0)'", "hydra.sweeper.params.x: low 5 > high 1"),
    ("hydra.sweeper.params.x='tag(log, interval(0.0, 1.0))'", "hydra.sweeper.params.x: log scale"),
    ("hydra.sweeper.params.y='choice(a'", "hydra.sweeper.params.y: cannot parse 'y=choice(a'"),
    ("x=interval(3.0,1.0)", "command-line override 'x=interval(3.0,1.0)': low 3 > high 1"),
    ("+hydra.sweeper.params.nokey='choice(1,2)'", "hydra.sweeper.params: overrides do not compose"),
    ("hydra.sweeper.storage='postgresql://127.0.0.1:1/x'", "hydra.sweeper.storage: cannot open"),
    (
        "hydra.sweeper.storage='postgresql+psycopg2://postgres@127.0.0.1:1/x'",
        "hydra.sweeper.storage: cannot open postgresql+psycopg2://postgres@127.0.0.1:1/x",
    ),
    # a key missing from the app config needs a + prefix (also for a conditional param,
    # which the pre-flight check composes with its condition made true)
    ("extra.alpha=choice(1,2)", "hydra.sweeper.params: overrides do not compose"),
    (
        "+hydra.sweeper.params.zz={when: {y: b}, space: 'choice(1, 2)'}",
        "hydra.sweeper.params: overrides do not compose",
    ),
    (
        "hydra.sweeper.params.x={when: {y: a}, space: 'interval(0.0, 1.0)'}",
        "hydra.sweeper.params.x: 'when' refers to 'y', which is written after it",
    ),
    (
        "hydra.sweeper.params.y={when: {nosuch: 1}, space: 'choice(a, b)'}",
        "hydra.sweeper.params.y: 'when' refers to 'nosuch', which is not in hydra.sweeper.params",
    ),
    (
        "hydra.sweeper.params.y={when: {x: 1}, space: 'choice(a, b)', default: a}",
        "hydra.sweeper.params.y: unknown key 'default'",
    ),
    (
        "+hydra.sweeper.params.report={when: {y: [a, c]}, space: 'choice(true, false)'}",
        "hydra.sweeper.params.report: 'when' y: 'c' can never hold (y is choice(a, b))",
    ),
]


@pytest.mark.parametrize("override,message", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_fails_before_any_job(tmp_path, override, message):
    proc = run_app(tmp_path, override)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(HINT)]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "markers").exists()
    assert not (tmp_path / "multirun").exists()
    assert not (tmp_path / "optuna.db").exists()


def _postgres_reason() -> str:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError as e:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({e})"
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL).connect():
            pass
    except Exception as e:  # driver missing, auth, no database `test`
        return f"cannot connect to {PG_URL}: {str(e).splitlines()[0]}"
    return ""


def test_postgres_storage(tmp_path):
    reason = _postgres_reason()
    if reason:
        pytest.skip(reason)
    name = f"atm_sweeper_test_{uuid.uuid4().hex[:12]}"
    try:
        proc = run_app(
            tmp_path, f"hydra.sweeper.storage='{PG_URL}'", f"hydra.sweeper.study_name={name}",
            "hydra.sweeper.n_trials=2",
        )
        assert proc.returncode == 0, proc.stderr
        study = optuna.load_study(study_name=name, storage=PG_URL)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        assert all(t.intermediate_values for t in study.trials)
        assert results(tmp_path)["study_name"] == name
    finally:
        if name in optuna.get_all_study_names(PG_URL):
            optuna.delete_study(study_name=name, storage=PG_URL)


# ----------------------------------------------------------------------------- in-process


def test_search_space_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from optuna.distributions import CategoricalDistribution as C
    from optuna.distributions import FloatDistribution as F
    from optuna.distributions import IntDistribution as I

    from hydra_plugins.atm_optuna_sweeper._space import parse_search_space

    lines = {
        "distill.logit_loss": ("choice(soft_ce, kl, mse)", C(["soft_ce", "kl", "mse"])),
        "distill.temperature": ("interval(1.0, 8.0)", F(1.0, 8.0)),
        "distill.weights.hidden": ("tag(log, interval(0.01, 1.0))", F(0.01, 1.0, log=True)),
        "trainer.lr": ("choice(1e-4, 3e-4)", C([1e-4, 3e-4])),
        "a": ("range(1, 5)", I(1, 4)),
        "b": ("range(0.5, 1.5, 0.5)", C([0.5, 1.0])),
        "c": ("interval(1, 8)", I(1, 8)),
        "d": ("tag(int, interval(1.0, 8.0))", I(1, 8)),
        "e": ("tag(log, range(1, 100))", I(1, 99, log=True)),
        "f": ("1,2", C([1, 2])),
    }
    space, fixed = parse_search_space(
        [(k, f"{k}={v}") for k, (v, _) in lines.items()] + [("g", "g=3"), ("h", "~h")],
        OverridesParser.create(),
    )
    assert {k: p.distribution for k, p in space.items()} == {k: d for k, (_, d) in lines.items()}
    assert fixed == {"g": "g=3", "h": "~h"}
    assert space["trainer.lr"].override(3e-4) == "trainer.lr=0.0003"
    assert space["distill.logit_loss"].override("kl") == "distill.logit_loss=kl"


def test_objective_values():
    from hydra_plugins.atm_optuna_sweeper._sweeper import _objective_values

    assert _objective_values(1, 1) == ([1.0], "")
    assert _objective_values((1.0, 2.0), 2) == ([1.0, 2.0], "")
    assert "None" in _objective_values(None, 1)[1]
    assert "NaN" in _objective_values(float("nan"), 1)[1]
    assert "not a number" in _objective_values("abc", 1)[1]
    assert "2 value(s) for 1 objective(s)" in _objective_values([1.0, 2.0], 1)[1]


def test_condition_matching():
    from hydra_plugins.atm_optuna_sweeper._space import same_value

    assert same_value(1, 1) and same_value(1, 1.0) and same_value("1", 1) and same_value(1, "1.0")
    assert same_value("mi_alpha", "mi_alpha") and not same_value("mi_alpha", "pkd")
    assert same_value(True, True) and same_value(True, "true") and not same_value(True, 1)
    assert same_value(None, None) and same_value(None, "null") and not same_value(0, None)
    assert not same_value(1, 2) and not same_value("a", 1)


DOC_PARAMS = {
    "distill.intermediate.loss": "choice(hidden_mse, pkd, infonce, mi_alpha)",
    "+distill.intermediate.options.alpha": {
        "when": {"distill.intermediate.loss": "mi_alpha"},
        "space": "interval(0.0, 1.0)",
    },
    "augment.name": "choice(none, random_replace, mask, contextual, repeated)",
    "augment.probability": {
        "when": {"augment.name": ["random_replace", "mask", "contextual", "repeated"]},
        "space": "interval(0.05, 0.5)",
    },
    "n": "choice(1, 2)",
    "++m": {"when": {"n": 1}, "space": "range(1, 4)"},
    "k": {"when": {"+m": [2, 3], "n": 1}, "space": "choice(a, b)"},
}


def _space(params, *arguments):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.atm_optuna_sweeper._space import build_search_space

    return build_search_space(params, list(arguments), OverridesParser.create())


def test_conditional_space_define_by_run():
    from hydra_plugins.atm_optuna_sweeper._space import probe_assignments, sample

    space, fixed = _space(DOC_PARAMS)
    alpha = space["distill.intermediate.options.alpha"]
    assert list(space) == [
        "distill.intermediate.loss", "distill.intermediate.options.alpha", "augment.name",
        "augment.probability", "n", "m", "k",
    ]
    assert fixed == {} and alpha.key == "+distill.intermediate.options.alpha"
    assert alpha.override(0.5) == "+distill.intermediate.options.alpha=0.5"
    assert space["m"].override(2) == "++m=2" and space["k"].when == {"m": [2, 3], "n": [1]}

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        values = sample(space, trial)
        assert values == trial.params
        loss, aug = values["distill.intermediate.loss"], values["augment.name"]
        assert ("distill.intermediate.options.alpha" in values) == (loss == "mi_alpha")
        assert ("augment.probability" in values) == (aug != "none")
        assert ("m" in values) == (values["n"] == 1)
        assert ("k" in values) == (values.get("m") in (2, 3))
        seen |= set(values)
        study.tell(trial, float(len(values)))
    assert seen == set(space)

    # the pre-flight probes try every value of a conditional param with its condition true
    rows = probe_assignments(space)
    alpha = "distill.intermediate.options.alpha"
    assert {r[alpha] for r in rows if alpha in r} == {0.0, 1.0}
    assert all((alpha in r) == (r["distill.intermediate.loss"] == "mi_alpha") for r in rows)
    assert {r["k"] for r in rows if "k" in r} == {"a", "b"}
    assert all(r["n"] == 1 and r["m"] in (2, 3) for r in rows if "k" in r)
    assert all(("m" in r) == (r["n"] == 1) for r in rows)


def test_conditional_space_with_command_line_overrides():
    from atm.sweeps.pruners import SweepError
    from hydra_plugins.atm_optuna_sweeper._sweeper import AtmOptunaSweeperImpl

    alpha = "distill.intermediate.options.alpha"
    # a command-line sweep replaces the space but keeps the condition (and the position)
    space, _ = _space(DOC_PARAMS, "+distill.intermediate.options.alpha=interval(0.0, 0.2)")
    assert list(space)[1] == alpha and space[alpha].when == {"distill.intermediate.loss": [
        "mi_alpha"]}
    assert space[alpha].distribution.high == 0.2
    # a condition on a key fixed on the command line is decided once
    space, fixed = _space(DOC_PARAMS, "distill.intermediate.loss=mi_alpha", "augment.name=none")
    assert space[alpha].when == {} and "augment.probability" not in space
    assert fixed["distill.intermediate.loss"] == "distill.intermediate.loss=mi_alpha"
    # conditions that contradict each other through a chain
    bad = {"a": "choice(1, 2)", "b": {"when": {"a": 1}, "space": "choice(x, y)"},
           "c": {"when": {"b": "x", "a": 2}, "space": "interval(0.0, 1.0)"}}
    with pytest.raises(SweepError, match=r"params\.c: 'when' can never hold together"):
        _space(bad)
    with pytest.raises(SweepError, match=r"grid sampler does not support conditional params"):
        AtmOptunaSweeperImpl(sampler={"name": "grid"})._make_sampler(_space(DOC_PARAMS)[0], 0)
    with pytest.raises(SweepError, match=r"params\.b\.when\.a: expected a value or a non-empty"):
        _space({"a": "choice(1, 2)", "b": {"when": {"a": []}, "space": "choice(x, y)"}})
