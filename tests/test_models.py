"""Tests of atm.models.encoder and atm.models.heads: presets, MLM, joint intent/slot model, XNLI head."""

from __future__ import annotations

import gzip
import re
from itertools import islice

import pytest
import torch
from conftest import MIRROR as DATA
from omegaconf import OmegaConf

from atm.errors import AtmError
from atm.models import (
    IGNORE_INDEX,
    JointIntentSlotConfig,
    JointIntentSlotModel,
    align_word_labels,
    build_mlm,
    build_pair_classifier,
    check_compatible,
    count_parameters,
    list_presets,
    load_checkpoint,
    load_joint_model,
    load_mlm,
    load_pair_classifier,
    load_preset,
    model_conf_dir,
    save_checkpoint,
    train_tokenizer,
    word_predictions,
)

SLURP_LM = DATA / "slurp" / "dataset" / "lm" / "lm.txt.gz"
TINY = ["teacher_tiny", "teacher_small", "intermediate_tiny", "student_tiny"]
PAPER = ["student_17m", "student_170m", "teacher_700m", "teacher_2b", "teacher_9b"]
VOCAB = 600
INTENTS = ["alarm_set", "play_music", "weather_query"]
SLOTS = ["O", "B-time", "I-time", "B-song", "I-song"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    if not SLURP_LM.is_file():
        pytest.skip(f"real data not found under {DATA} (set ATM_DATA_MIRROR)")
    with gzip.open(SLURP_LM, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in islice(f, 2000)]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer", VOCAB)


@pytest.fixture(scope="module")
def batch(tok):
    return tok(["wake me up at seven am", "play some jazz", "what's the weather"], padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def mlm_dir(tok, tmp_path_factory):
    model = build_mlm(load_preset("student_tiny"), tok, seed=0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt") / "student")


# --------------------------------------------------------------------------------------- presets


def test_presets_are_listed_and_valid():
    names = list_presets()
    assert set(TINY + PAPER) <= set(names)
    for name in names:
        preset = load_preset(name)
        assert preset["name"] == name
        assert "vocab_size" not in preset
        assert preset["hidden_size"] % preset["num_attention_heads"] == 0


def _comment_int(text: str, key: str) -> int:
    m = re.search(rf"^# {key}: (\d+)", text, re.MULTILINE)
    assert m, f"comment '# {key}: N' missing"
    return int(m.group(1))


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_match_nominal_size(name):
    text = (model_conf_dir() / f"{name}.yaml").read_text()
    nominal = _comment_int(text, "nominal_params")
    vocab = _comment_int(text, "assumed_vocab_size")
    preset = load_preset(name)
    non_emb = count_parameters(preset, vocab_size=vocab, non_embedding=True)
    total = count_parameters(preset, vocab_size=vocab)
    assert abs(non_emb / nominal - 1) <= 0.15, (name, non_emb, nominal)
    assert non_emb == _comment_int(text, "non_embedding_params")
    assert total == _comment_int(text, "total_params_at_assumed_vocab")
    assert preset["max_position_embeddings"] >= 514


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_build_forward_and_count(name, tok, batch):
    preset = load_preset(name)
    model = build_mlm(preset, tok, max_seq_len=128, seed=0).eval()
    cfg = model.config
    assert cfg.vocab_size == len(tok) == VOCAB
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.type_vocab_size) == (1, 0, 2, 1)
    assert cfg.num_hidden_layers == preset["num_hidden_layers"] and cfg.hidden_size == preset["hidden_size"]
    out = model(**batch, output_hidden_states=True)
    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, T, VOCAB)
    assert len(out.hidden_states) == preset["num_hidden_layers"] + 1
    assert out.hidden_states[0].shape == (B, T, preset["hidden_size"])
    # analytic count == counted unique parameters (output embedding tied to the input embedding)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == count_parameters(preset, vocab_size=VOCAB) == count_parameters(cfg)
    assert count_parameters(model, non_embedding=True) == count_parameters(cfg, non_embedding=True)
    assert model.lm_head.decoder.weight is model.roberta_prelayernorm.embeddings.word_embeddings.weight


def test_build_from_hydra_dictconfig_and_seed(tok):
    cfg = OmegaConf.load(model_conf_dir() / "teacher_tiny.yaml")
    a = build_mlm(cfg, tok, seed=1)
    b = build_mlm(load_preset("teacher_tiny"), tok, seed=1)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_preset_errors(tok):
    good = load_preset("student_tiny")
    with pytest.raises(AtmError, match="unknown model key 'hiden_size'"):
        build_mlm({**good, "hiden_size": 64}, tok)
    with pytest.raises(AtmError, match="'vocab_size'.*comes from the tokenizer"):
        build_mlm({**good, "vocab_size": 100}, tok)
    with pytest.raises(AtmError, match="not divisible"):
        build_mlm({**good, "num_attention_heads": 3}, tok)
    with pytest.raises(AtmError, match="'intermediate_size' is missing"):
        build_mlm({k: v for k, v in good.items() if k != "intermediate_size"}, tok)
    with pytest.raises(AtmError, match=r"max_seq_len=257 .* >= max_seq_len \+ 2 = 259.*has 258"):
        build_mlm(good, tok, max_seq_len=257)
    build_mlm(good, tok, max_seq_len=256)
    with pytest.raises(AtmError, match="unknown model preset 'nope'"):
        load_preset("nope")


# ----------------------------------------------------------------------------------- checkpoints


def test_mlm_save_load_round_trip(tok, batch, mlm_dir):
    files = {p.name for p in mlm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "spm.model"} <= files
    assert not [p for p in mlm_dir.parent.iterdir() if p.name.startswith(".")]
    original = build_mlm(load_preset("student_tiny"), tok, seed=0).eval()
    loaded = load_mlm(mlm_dir)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, loaded(**batch).logits)
    model, tok2 = load_checkpoint(mlm_dir)
    assert tok2.get_vocab() == tok.get_vocab()
    assert tok.model_max_length == 512 and tok2.model_max_length == 256  # 258 positions - 2
    assert model.lm_head.decoder.weight is model.roberta_prelayernorm.embeddings.word_embeddings.weight


def test_tokenizer_model_mismatch(tok, tmp_path, mlm_dir):
    other = build_mlm(load_preset("student_tiny"), tok)
    other.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(AtmError, match=rf"{VOCAB} tokens.*vocab_size={VOCAB + 8}"):
        save_checkpoint(other, tok, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(AtmError, match=rf"{VOCAB} tokens.*vocab_size={VOCAB + 8}"):
        check_compatible(tok, other.config)
    # a checkpoint whose tokenizer was swapped for one of another size
    other.save_pretrained(tmp_path / "swapped")
    tok.save_pretrained(tmp_path / "swapped")
    with pytest.raises(AtmError, match=rf"swapped.*{VOCAB} tokens.*vocab_size={VOCAB + 8}"):
        load_mlm(tmp_path / "swapped")


def test_load_errors(tmp_path, mlm_dir, tok):
    with pytest.raises(AtmError, match="nope: checkpoint directory not found"):
        load_mlm(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtmError, match="no config.json"):
        load_mlm(tmp_path / "empty")
    joint = JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS)
    save_checkpoint(joint, tok, tmp_path / "joint")
    msg = r"joint: a atm-joint-intent-slot \(JointIntentSlotModel\) checkpoint, not a pre-LN RoBERTa MLM"
    with pytest.raises(AtmError, match=msg):
        load_mlm(tmp_path / "joint")
    with pytest.raises(AtmError, match="RobertaPreLayerNormForMaskedLM.* not a joint intent/slot model"):
        load_joint_model(mlm_dir)
    save_checkpoint(build_pair_classifier(mlm_dir), tok, tmp_path / "xnli")
    with pytest.raises(AtmError, match="RobertaPreLayerNormForSequenceClassification.*not a pre-LN RoBERTa MLM"):
        load_mlm(tmp_path / "xnli")  # its LM head would be random
    with pytest.raises(AtmError, match="not a pre-LN RoBERTa pair classifier"):
        load_pair_classifier(mlm_dir)


# ----------------------------------------------------------------------------------- joint model


def _slot_labels(batch, rng_seed=0):
    g = torch.Generator().manual_seed(rng_seed)
    labels = torch.randint(0, len(SLOTS), batch["input_ids"].shape, generator=g)
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    labels[:, 0] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("pooling", ["first", "mean", "max"])
def test_joint_forward_loss_backward(mlm_dir, batch, pooling):
    model = JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS, pooling=pooling, slot_loss_coef=0.5)
    B, T = batch["input_ids"].shape
    intents = torch.tensor([0, 1, 2])
    slots = _slot_labels(batch)
    out = model(**batch, intent_labels=intents, slot_labels=slots)
    assert out.intent_logits.shape == (B, len(INTENTS))
    assert out.slot_logits.shape == (B, T, len(SLOTS))
    ce = torch.nn.functional.cross_entropy
    intent_ce = ce(out.intent_logits, intents)
    slot_ce = ce(out.slot_logits.reshape(-1, len(SLOTS)), slots.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, intent_ce + 0.5 * slot_ce)
    out.loss.backward()
    assert model.roberta_prelayernorm.embeddings.word_embeddings.weight.grad is not None
    assert model.intent_classifier.weight.grad is not None and model.slot_classifier.weight.grad is not None
    assert model(**batch).loss is None


def test_joint_pooling_ignores_padding(mlm_dir, tok):
    for pooling in ("first", "mean", "max"):
        model = JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS, pooling=pooling).eval()
        alone = tok(["play some jazz"], return_tensors="pt")
        padded = tok(["play some jazz", "wake me up at seven in the morning please"], padding=True, return_tensors="pt")
        with torch.no_grad():
            a = model(**alone).intent_logits[0]
            b = model(**padded).intent_logits[0]
        assert torch.allclose(a, b, atol=1e-5), pooling


def test_joint_copies_encoder_and_freezes(mlm_dir, batch):
    mlm = load_mlm(mlm_dir)
    model = JointIntentSlotModel.from_encoder(mlm, INTENTS, SLOTS, freeze_encoder=True)
    enc_state = mlm.roberta_prelayernorm.state_dict()
    for k, v in model.roberta_prelayernorm.state_dict().items():
        assert torch.equal(v, enc_state[k]), k
    out = model(**batch, intent_labels=torch.tensor([0, 1, 2]), slot_labels=_slot_labels(batch))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.roberta_prelayernorm.parameters())
    assert model.intent_classifier.weight.grad is not None and model.slot_classifier.weight.grad is not None


def test_joint_save_load(mlm_dir, tok, batch, tmp_path):
    model = JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS, pooling="max", freeze_encoder=True).eval()
    save_checkpoint(model, tok, tmp_path / "joint")
    loaded = load_joint_model(tmp_path / "joint")
    assert isinstance(loaded.config, JointIntentSlotConfig)
    assert loaded.config.intent_labels == INTENTS and loaded.config.slot_labels == SLOTS
    assert (loaded.config.num_intents, loaded.config.num_slot_labels, loaded.config.pooling) == (3, 5, "max")
    assert not any(p.requires_grad for p in loaded.roberta_prelayernorm.parameters())
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.intent_logits, b.intent_logits) and torch.equal(a.slot_logits, b.slot_logits)


def test_joint_config_errors(mlm_dir):
    with pytest.raises(AtmError, match="pooling"):
        JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS, pooling="cls")
    with pytest.raises(AtmError, match="unknown joint model option 'slot_coef'"):
        JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, SLOTS, slot_coef=2.0)
    with pytest.raises(AtmError, match="duplicate label 'O'"):
        JointIntentSlotModel.from_encoder(mlm_dir, INTENTS, ["O", "O"])
    with pytest.raises(AtmError, match="num_intents=4 disagrees"):
        JointIntentSlotConfig(intent_labels=INTENTS, num_intents=4)


# ------------------------------------------------------------------------------------- alignment


def _hand_tokenizer():
    from transformers import XLMRobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "▁", "▁me", "▁up", "w", "a", "k", "e"]
    return XLMRobertaTokenizer(vocab=[(p, 0.0 if i < 5 else -1.0) for i, p in enumerate(pieces)])


def test_align_first_subtoken_hand_example():
    tok = _hand_tokenizer()
    words = ["wake", "me", "up"]
    enc = tok(words, is_split_into_words=True)
    # "wake" is not in the vocabulary: ▁ w a k e (5 sub-tokens)
    assert enc.tokens() == ["<s>", "▁", "w", "a", "k", "e", "▁me", "▁up", "</s>"]
    assert enc.word_ids() == [None, 0, 0, 0, 0, 0, 1, 2, None]
    labels = align_word_labels(enc.word_ids(), [1, 0, 2])
    assert labels == [-100, 1, -100, -100, -100, -100, 0, 2, -100]
    token_pred = [9, 1, 7, 7, 7, 7, 0, 2, 9]
    assert word_predictions(enc.word_ids(), token_pred) == [1, 0, 2]
    # truncation cut the last word: it gets the fill value
    assert word_predictions([None, 0, 0, 1, None], [5, 1, 4, 0, 5], n_words=3, fill=0) == [1, 0, 0]
    with pytest.raises(AtmError, match="word id 2 has no label"):
        align_word_labels(enc.word_ids(), [1, 0])


def test_align_with_trained_tokenizer_and_padding(tok):
    words = [["wakeupppp", "me", "at", "seven"], ["play", "jazz"]]
    enc = tok(words, is_split_into_words=True, padding=True)
    first = enc.word_ids(0)
    assert first.count(0) > 1  # "wakeupppp" splits into several sub-tokens
    labels = align_word_labels(first, [1, 0, 0, 2])
    assert sum(1 for x in labels if x != IGNORE_INDEX) == 4
    assert labels[first.index(0)] == 1 and labels[first.index(3)] == 2
    padded = align_word_labels(enc.word_ids(1), [0, 3])
    assert len(padded) == len(first) and padded[-1] == IGNORE_INDEX
    # prediction = label at first sub-tokens -> the word labels come back
    assert word_predictions(first, [x if x != IGNORE_INDEX else 4 for x in labels]) == [1, 0, 0, 2]


# ------------------------------------------------------------------------------- pair classifier


def test_pair_classifier(mlm_dir, tok, tmp_path):
    model = build_pair_classifier(mlm_dir)
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    mlm = load_mlm(mlm_dir)
    w = mlm.roberta_prelayernorm.encoder.layer[0].attention.self.query.weight
    assert torch.equal(model.roberta_prelayernorm.encoder.layer[0].attention.self.query.weight, w)
    enc = tok(["Er schläft.", "wake me up"], ["Er ist wach.", "set an alarm"], padding=True, return_tensors="pt")
    assert "token_type_ids" not in enc
    out = model(**enc, labels=torch.tensor([2, 1]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    out.loss.backward()
    model.eval()
    save_checkpoint(model, tok, tmp_path / "xnli")
    loaded = load_pair_classifier(tmp_path / "xnli")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, loaded(**enc).logits)
    with pytest.raises(AtmError, match="labels has 2 names but num_labels=3"):
        build_pair_classifier(mlm, 3, labels=["yes", "no"])


# ------------------------------------------------------------------------------------ intent layer


def test_joint_intent_layer_pools_the_chosen_hidden_state(mlm_dir, batch, tmp_path, tok):
    mlm = load_mlm(mlm_dir)
    n_layers = mlm.config.num_hidden_layers
    for layer in (0, 1, -2, n_layers):
        model = JointIntentSlotModel.from_encoder(mlm, INTENTS, SLOTS, pooling="mean", intent_layer=layer).eval()
        with torch.no_grad():
            out = model(**batch)
            states = model.roberta_prelayernorm(**batch, output_hidden_states=True).hidden_states
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (states[layer] * m).sum(1) / m.sum(1)  # mean over real tokens of hidden state `layer`
        assert torch.allclose(out.intent_logits, model.intent_classifier(pooled), atol=1e-6), layer
        assert torch.allclose(out.slot_logits, model.slot_classifier(states[-1]), atol=1e-6)  # slots: last layer
    # -1 and L are the same (last) layer; the embeddings (0) give other logits
    last = JointIntentSlotModel.from_encoder(mlm, INTENTS, SLOTS, intent_layer=-1).eval()
    emb = JointIntentSlotModel.from_encoder(mlm, INTENTS, SLOTS, intent_layer=0).eval()
    emb.load_state_dict(last.state_dict())
    with torch.no_grad():
        assert not torch.allclose(last(**batch).intent_logits, emb(**batch).intent_logits)
    save_checkpoint(emb, tok, tmp_path / "emb")
    assert load_joint_model(tmp_path / "emb").config.intent_layer == 0
    for bad in (n_layers + 1, -(n_layers + 2), 1.5, True):
        with pytest.raises(AtmError, match=rf"intent_layer must be an integer index into the {n_layers + 1} hidden"):
            JointIntentSlotModel.from_encoder(mlm, INTENTS, SLOTS, intent_layer=bad)


def test_training_dropout_off_inside_restored_after_and_checkpoint_keeps_config(tok, batch, tmp_path):
    import json

    from atm.models.encoder import training_dropout

    model = build_mlm(load_preset("student_tiny"), tok, seed=0).train()
    assert model.config.hidden_dropout_prob == 0.1
    with torch.no_grad():
        assert not torch.equal(model(**batch).logits, model(**batch).logits)  # dropout on
        with training_dropout(model, 0.0):
            assert torch.equal(model(**batch).logits, model(**batch).logits)
            save_checkpoint(model, tok, tmp_path / "ckpt")
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.1 and config["attention_probs_dropout_prob"] == 0.1
