"""The data every stage reads, logged as MLflow dataset inputs (atm/data/mlflow_datasets.py).

Unit tests of the helper on a throw-away SQLite store, then real tiny stages run in-process on the real data
(tokenizer, Stage-1 pretraining, MASSIVE fine-tuning, XNLI fine-tuning, checkpoint evaluation): the dataset
names and contexts of each run, digests equal across runs that read the same data and different when the data
differ, and profile sizes equal to what the readers return for the same settings outside a run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from conftest import REPO, TINY, mlflow_store

from atm.data import mlflow_datasets as D

MASSIVE_URL = "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz"


@pytest.fixture
def tracking(tmp_path):
    """A fresh SQLite store as MLflow's tracking URI (restored afterwards): ``(client, experiment id)``."""
    uri, client, experiment_id = mlflow_store(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield client, experiment_id
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


def _inputs(client, run_id: str) -> dict[str, dict]:
    """The run's dataset inputs by name: digest, context, profile, source type and source."""
    out = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        tags = {tag.key: tag.value for tag in item.tags}
        ds = item.dataset
        assert ds.name not in out, f"dataset {ds.name} logged twice"
        out[ds.name] = {"digest": ds.digest, "context": tags.get("mlflow.data.context"),
                        "profile": json.loads(ds.profile), "source_type": ds.source_type,
                        "source": json.loads(ds.source)}
    return out


# ---------------------------------------------------------------------------------------------- helper


def test_nothing_is_logged_outside_a_run():
    assert mlflow.active_run() is None and D.active_run_id() is None

    def never():
        raise AssertionError("a read was built outside a run")
        yield

    assert D.log_reads(never()) == 0
    assert D.log_text_dataset("written/x", ["a", "b"], ["x/a.txt"], "training") is False
    assert D.log_examples_dataset("x/test/en", [1, 2], ["x/a.txt"], "test", key=str) is False


def test_the_readers_do_not_import_mlflow():
    code = ("import sys; from atm.data import corpora, mlflow_datasets as D; from atm.tasks import massive; "
            "from atm.probes import xnli; assert D.log_text_dataset('a', ['x'], ['f'], 'test') is False; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_digest_is_the_content_in_order():
    assert D.digest(["a", "b"]) == D.digest(iter(["a", "b"]))
    assert len({D.digest(["a", "b"]), D.digest(["b", "a"]), D.digest(["ab"]), D.digest(["a", "b", ""]),
                D.digest([])}) == 5
    assert len(D.digest(["a"])) == D.DIGEST_CHARS


def test_a_dataset_is_logged_once_with_its_profile_source_and_context(tracking, monkeypatch, tmp_path):
    client, experiment_id = tracking
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path / "data"))
    lines, langs = ["hello there", "guten tag", "hi"], ["en", "de", "en"]
    with mlflow.start_run(experiment_id=experiment_id) as run:
        assert D.log_text_dataset("spoken/massive", lines, ["massive/amazon-massive-dataset-1.1.tar.gz"],
                                  "training", langs=langs)
        assert not D.log_text_dataset("spoken/massive", list(lines), ["massive/amazon-massive-dataset-1.1.tar.gz"],
                                      "training", langs=langs)  # the same content again: not logged again
        assert D.log_examples_dataset("xnli/test/de", [("a", 1), ("b", 2)],
                                      ["xnli/hf_jsonl/de/test.jsonl.gz"], "test", key=repr)
        assert D.log_reads(D.text_read(f"ud_pud/test/{lang}", ["x"], [f"ud/UD_{lang}-PUD/t.conllu.gz",
                                                                       f"ud/UD_{lang}-PUD/u.conllu.gz"], "test")
                           for lang in ("en", "fr")) == 2
        D._logged.clear()  # MLflow itself keeps one input per name and digest
        D.log_text_dataset("spoken/massive", lines, ["massive/amazon-massive-dataset-1.1.tar.gz"], "training")
        with pytest.raises(ValueError, match="context 'train' must be one of training, evaluation, test"):
            D.log_text_dataset("spoken/massive", lines, [], "train")
        with pytest.raises(ValueError, match="2 languages for 3 lines"):
            D.log_text_dataset("spoken/other", lines, [], "training", langs=["en", "de"])
    inputs = _inputs(client, run.info.run_id)
    assert set(inputs) == {"spoken/massive", "xnli/test/de", "ud_pud/test/en", "ud_pud/test/fr"}
    massive = inputs["spoken/massive"]
    assert massive == {"digest": D.digest(lines), "context": "training", "source_type": "http",
                       "source": {"url": MASSIVE_URL},
                       "profile": {"num_rows": 3, "num_rows_per_language": {"de": 1, "en": 2},
                                   "files": ["massive/amazon-massive-dataset-1.1.tar.gz"]}}
    xnli = inputs["xnli/test/de"]
    assert xnli["context"] == "test" and xnli["digest"] == D.digest(["('a', 1)", "('b', 2)"])
    assert xnli["source_type"] == "local"
    assert xnli["source"] == {"uri": str(tmp_path / "data" / "xnli/hf_jsonl/de/test.jsonl.gz")}
    assert xnli["profile"] == {"num_rows": 2, "files": ["xnli/hf_jsonl/de/test.jsonl.gz"]}
    assert inputs["ud_pud/test/fr"]["source"] == {"uri": str(tmp_path / "data" / "ud/UD_fr-PUD")}


# ------------------------------------------------------------------------------------------------ stages

WRITTEN = {f"written/{s}" for s in ("ud", "udpos_xtreme", "xnli")}
SPOKEN = {"spoken/massive", "spoken/slurp_lm"}
HELDOUT = {"written/ud_dev", "spoken/massive_dev"}
COST = "cost/massive_dev"  # the utterances cost.measure times the student on
FINETUNE = ["trainer.max_steps=4", "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.log_every=2",
            "data.max_seq_len=32", "finetune.max_train_per_locale=48", "finetune.max_eval_per_locale=24"]


@pytest.fixture(scope="module")
def runs(real_data_env, tmp_path_factory):
    """Real tiny runs in one store, in-process: three tokenizers (the second as the first, the third with
    another line cap), Stage 1 over the first, MASSIVE fine-tuning (twice the same, once on de-DE with early
    stopping), XNLI fine-tuning and the evaluation of an untrained encoder. Yields ``(client, {key: run id})``."""
    from atm.lineage import compose_stage
    from atm.models import build_mlm, load_preset, save_checkpoint
    from atm.models.tokenizer import load_tokenizer
    from atm.tracking import download
    from atm.train import execute

    root = tmp_path_factory.mktemp("datasets")
    uri, client, _ = mlflow_store(root)
    previous = mlflow.get_tracking_uri()
    base = [f"tracking.uri={uri}", f"tracking.cache_dir={root / 'cache'}"]

    def run(stage: str, *args: str) -> str:
        return execute(compose_stage(stage, [*base, *args]))[0]

    try:
        ids = {"tok_a": run("train_tokenizer", *TINY), "tok_b": run("train_tokenizer", *TINY),
               "tok_c": run("train_tokenizer", *TINY, "tokenizer.max_lines_per_source=50")}
        ids["stage1"] = run("pretrain_stage1", *TINY, f"tokenizer_run=runs:/{ids['tok_a']}", "model=student_tiny",
                            "trainer.max_steps=2", "data.written.max_lines_per_source=60")
        tokenizer = load_tokenizer(download(ids["tok_a"], "tokenizer", root / "cache"))
        encoder = save_checkpoint(build_mlm(load_preset("student_tiny"), tokenizer, seed=0), tokenizer,
                                  root / "encoder")
        ft = ["encoder=" + str(encoder), *FINETUNE]
        ids["ft_a"] = run("finetune", *ft)
        ids["ft_b"] = run("finetune", *ft)
        ids["ft_c"] = run("finetune", *ft, "finetune.locales=[de-DE]", "finetune.max_train_per_locale=32",
                          "finetune.early_stopping.eval_every=2", "finetune.early_stopping.max_dev_per_locale=16")
        ids["xnli"] = run("finetune_xnli", *TINY, "encoder=" + str(encoder), "trainer.max_steps=2",
                          "stage.languages=[de]")
        ids["eval"] = run("evaluate", *TINY, "target=" + str(encoder), "eval.checkpoints=final",
                          "eval.perplexity.written_languages=[en]", "eval.mask_fill.languages=[en,de]",
                          "eval.mask_fill.max_sentences_per_lang=6", "eval.perplexity.spoken_locales=[en-US]",
                          "eval.mask_fill.spoken_locales=[en-US,de-DE]", "eval.mask_fill.max_utterances_per_locale=5",
                          "eval.xnli.languages=[en,de]", "eval.xnli.epochs=1")
        yield client, ids
    finally:
        mlflow.set_tracking_uri(previous)


def test_the_tokenizer_logs_its_text_by_source(runs):
    from atm.data import corpora

    client, ids = runs
    a, b, c = (_inputs(client, ids[k]) for k in ("tok_a", "tok_b", "tok_c"))
    assert set(a) == WRITTEN | SPOKEN | HELDOUT
    assert {name: item["context"] for name, item in a.items()} == {
        **{name: "training" for name in WRITTEN | SPOKEN}, **{name: "evaluation" for name in HELDOUT}}
    # what the corpora return for the same settings outside a run (nothing logged there)
    lines = corpora.written_corpus(60, seed=0) + corpora.spoken_corpus(60, seed=0)
    for name in WRITTEN | SPOKEN:  # the source names of the two corpora differ
        texts = [line.text for line in lines if line.source == name.split("/")[1]]
        assert a[name]["profile"]["num_rows"] == len(texts) > 0, name
        assert a[name]["digest"] == D.digest(texts), name
        assert sum(a[name]["profile"]["num_rows_per_language"].values()) == len(texts)
    logged = client.get_run(ids["tok_a"]).data.metrics["data/tokenizer_lines"]
    assert sum(a[name]["profile"]["num_rows"] for name in WRITTEN | SPOKEN) == logged
    heldout = corpora.heldout_written(4) + corpora.heldout_spoken(4)
    assert a["spoken/massive_dev"]["profile"]["num_rows"] == sum(line.source == "massive_dev" for line in heldout)
    assert a["spoken/massive"]["source"] == {"url": MASSIVE_URL}
    assert a["written/ud"]["source_type"] == "local" and a["written/ud"]["source"]["uri"].endswith("/ud")
    # the same data, the same digests; another cap, other training text (held-out text unchanged)
    assert {n: i["digest"] for n, i in a.items()} == {n: i["digest"] for n, i in b.items()}
    assert a["written/ud"]["digest"] != c["written/ud"]["digest"]
    assert c["written/ud"]["profile"]["num_rows"] < a["written/ud"]["profile"]["num_rows"]
    assert {n: c[n]["digest"] for n in HELDOUT} == {n: a[n]["digest"] for n in HELDOUT}


def test_pretraining_logs_its_corpus_and_heldout_text(runs):
    client, ids = runs
    stage1, tok = _inputs(client, ids["stage1"]), _inputs(client, ids["tok_a"])
    assert set(stage1) == WRITTEN | HELDOUT | {COST}  # no spoken text in Stage 1
    # the tokenizer read the written corpus with the same cap (60) and the held-out text with the same cap (4)
    assert {n: stage1[n]["digest"] for n in WRITTEN | HELDOUT} == {n: tok[n]["digest"] for n in WRITTEN | HELDOUT}
    assert stage1[COST]["context"] == "evaluation"
    assert stage1[COST]["profile"]["num_rows_per_language"] == {"en-US": 8}  # cost.utterances of cost.locale
    assert {stage1[n]["context"] for n in WRITTEN} == {"training"}
    train_lines = client.get_run(ids["stage1"]).data.metrics["data/train_lines"]
    assert sum(stage1[n]["profile"]["num_rows"] for n in WRITTEN) == train_lines


def test_finetuning_logs_massive_splits_per_locale(runs):
    from omegaconf import OmegaConf

    from atm.tasks import massive as T

    client, ids = runs
    a, b, c = (_inputs(client, ids[k]) for k in ("ft_a", "ft_b", "ft_c"))
    assert {n: i["context"] for n, i in a.items()} == {"massive/train/en-US": "training",
                                                        "massive/test/en-US": "test", COST: "evaluation"}
    assert a == b
    assert a["massive/train/en-US"]["profile"]["num_rows"] == 48
    assert client.get_run(ids["ft_a"]).data.metrics["data/train_examples"] == 48
    test = T.eval_examples(OmegaConf.create({"eval_locales": ["en-US"], "eval_split": "test",
                                             "max_eval_per_locale": 24}))["en-US"]
    assert a["massive/test/en-US"]["profile"]["num_rows"] == len(test) == 24
    assert a["massive/test/en-US"]["digest"] == D.digest(map(T.example_key, test))
    assert a["massive/test/en-US"]["source"] == {"url": MASSIVE_URL}
    # another locale, another cap, early stopping on dev
    assert {n: i["context"] for n, i in c.items()} == {"massive/train/de-DE": "training",
                                                        "massive/test/de-DE": "test",
                                                        "massive/dev/de-DE": "evaluation", COST: "evaluation"}
    assert c["massive/train/de-DE"]["profile"]["num_rows"] == 32
    assert c["massive/dev/de-DE"]["profile"]["num_rows"] == 16
    assert c["massive/test/de-DE"]["digest"] != a["massive/test/en-US"]["digest"]


def test_xnli_finetuning_and_evaluation_log_their_pairs(runs):
    client, ids = runs
    xnli, ev = _inputs(client, ids["xnli"]), _inputs(client, ids["eval"])
    assert {n: i["context"] for n, i in xnli.items()} == {"xnli/train/en": "training", "xnli/test/de": "test"}
    assert xnli["xnli/train/en"]["profile"]["num_rows"] == 24  # eval.xnli.train_pairs
    assert xnli["xnli/test/de"]["profile"]["num_rows"] == 8  # eval.xnli.max_test_pairs_per_lang
    assert xnli["xnli/test/de"]["source_type"] == "local"
    # the evaluation's probe (seed 0) trains on the same 24 pairs as finetune_xnli with seed 0
    assert ev["xnli/train/en"]["digest"] == xnli["xnli/train/en"]["digest"]
    assert ev["xnli/test/de"]["digest"] == xnli["xnli/test/de"]["digest"]
    assert {n: i["context"] for n, i in ev.items()} == {
        "xnli/train/en": "training", "xnli/test/en": "test", "xnli/test/de": "test",
        "ud_pud/test/en": "test", "ud_pud/test/de": "test", "massive/test/en-US": "test",
        "massive/test/de-DE": "test", "written/ud_dev": "evaluation", "spoken/massive_dev": "evaluation"}
    # the longer prefix its probes read: perplexity 4 lines, mask filling 6 sentences / 5 utterances
    sizes = {n: i["profile"]["num_rows"] for n, i in ev.items()}
    assert (sizes["ud_pud/test/en"], sizes["ud_pud/test/de"]) == (6, 6)
    assert (sizes["massive/test/en-US"], sizes["massive/test/de-DE"]) == (5, 5)
    assert {n: ev[n]["digest"] for n in HELDOUT} == {n: _inputs(client, ids["tok_a"])[n]["digest"] for n in HELDOUT}


_RACE = """
import sys, time
import mlflow
from atm.data.mlflow_datasets import log_reads, text_read
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("race")
with mlflow.start_run():
    reads = [text_read(f"written/source{i}", [f"line {i} {j}" for j in range(3)], [], "training") for i in range(20)]
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    log_reads(reads)
"""


def test_runs_logging_the_same_datasets_at_once_all_succeed(tmp_path):
    """Four processes log the same 20 new datasets to one fresh SQLite store at the same instant: every one
    succeeds (MLflow inserts a new dataset after looking for it: unlocked, some fail on its unique key),
    and every run has the 20 inputs."""


    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("race")
    start = time.time() + 12
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, uri, str(start)], cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-1500:] for e in errors]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert len(runs) == 4
    for run in runs:
        names = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
        assert names == sorted(f"written/source{i}" for i in range(20))
