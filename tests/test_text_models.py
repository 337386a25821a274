"""Chimera text models: the encoder, MLM and GLUE heads, presets and parameter counts, and the
Hugging Face wrappers (Auto registration, save/load round trips, strict MLM -> classifier)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from chimera.models.hf import (
    ChimeraTextConfig,
    ChimeraTextForMaskedLM,
    ChimeraTextForSequenceClassification,
    ChimeraTextModel,
    load_finetuned_into_classifier,
    load_mlm_into_classifier,
)
from chimera.models.text import (
    TEXT_PRESETS,
    ChimeraTextClassifier,
    ChimeraTextEncoder,
    ChimeraTextMLM,
    approx_parameter_count,
    count_parameters,
    text_preset,
)

V = 50
TINY = dict(vocab_size=V, d_model=32, n_layer=2, d_state=8, headdim=16, expand=2.0, d_conv=7)
HF_TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, d_state=8, headdim=16,
               expand=2.0, d_conv=7)


def _batch(seed=0, b=3, T=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids.masked_fill(mask == 0, 0), mask


# --- plain PyTorch models ---------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dag", "ug"])
def test_encoder_sentence_alone_equals_padded_and_packed(variant):
    torch.manual_seed(0)
    enc = ChimeraTextEncoder(**TINY, variant=variant).double().eval()
    assert not any("position" in n for n, _ in enc.named_parameters())
    lens = (4, 9, 6)
    g = torch.Generator().manual_seed(1)
    sents = [torch.randint(1, V, (1, n), generator=g) for n in lens]
    want = [enc(s) for s in sents]
    # left padding, pads hold real-looking tokens (any leak would show)
    T = 10
    ids = torch.randint(1, V, (3, T), generator=g)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(sents):
        ids[i, T - lens[i]:], mask[i, T - lens[i]:] = s[0], 1
    h = enc(ids, attention_mask=mask)
    assert h.shape == (3, T, 32)
    for i, w in enumerate(want):
        torch.testing.assert_close(h[i:i + 1, T - lens[i]:], w, atol=1e-6, rtol=0)
    # one packed row
    cu = torch.tensor([0, 4, 13, 19])
    h = enc(torch.cat(sents, 1), cu_seqlens=cu)
    for k, w in enumerate(want):
        torch.testing.assert_close(h[:, cu[k]:cu[k + 1]], w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["dag", "ug"])
def test_one_token_inputs(variant):
    torch.manual_seed(0)
    m = ChimeraTextMLM(**TINY, variant=variant).eval()
    assert m(torch.tensor([[5], [7]]))["logits"].shape == (2, 1, V)
    # and a one-token sentence packed between others equals it alone
    ids = torch.tensor([[3, 4, 5, 9, 6, 7]])
    out = m(ids, cu_seqlens=torch.tensor([0, 3, 4, 6]))["logits"]
    torch.testing.assert_close(out[:, 3:4], m(ids[:, 3:4])["logits"], atol=1e-5, rtol=0)


def test_mlm_head_is_tied_and_sparse_logits_match():
    torch.manual_seed(0)
    m = ChimeraTextMLM(**TINY).eval()
    assert m.lm_head.decoder.weight is m.encoder.embeddings.word_embeddings.weight
    ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[2, 0] = 7, 9, 11
    full = m(ids, mask, labels=labels)
    assert full["logits"].shape == (3, 11, V)
    want = F.cross_entropy(full["logits"][labels != -100], labels[labels != -100])
    torch.testing.assert_close(full["loss"], want)
    sparse = m(ids, mask, labels=labels, logits_at_labels_only=True)
    torch.testing.assert_close(sparse["logits"], full["logits"][labels != -100])
    torch.testing.assert_close(sparse["loss"], full["loss"])
    sparse["loss"].backward()  # the tied weight gets the decoder's and the embedding's gradient
    assert m.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    # a batch without masked tokens gives a zero loss, not NaN
    none = m(ids, mask, labels=torch.full_like(ids, -100))
    assert none["loss"].item() == 0.0
    with pytest.raises(ValueError, match="needs labels"):
        m(ids, mask, logits_at_labels_only=True)


def test_init_follows_bert_and_keeps_the_mixer_init():
    torch.manual_seed(0)
    m = ChimeraTextMLM(**{**TINY, "d_model": 64, "vocab_size": 2000})
    emb = m.encoder.embeddings.word_embeddings.weight
    assert emb[0].abs().max() == 0  # padding row
    assert emb[1:].std().item() == pytest.approx(0.02, rel=0.1)
    mixer = m.encoder.layers[0].mixer
    assert torch.all(mixer.A_log == 0) and torch.all(mixer.D == 1)
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    dt = F.softplus(mixer.dt_bias)
    assert bool(((dt > 0.0009) & (dt < 0.11)).all())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_pools_real_tokens_whatever_the_padding_side(pooling):
    torch.manual_seed(0)
    c = ChimeraTextClassifier(num_labels=3, pooling=pooling, **TINY).double().eval()
    g = torch.Generator().manual_seed(2)
    s = torch.randint(1, V, (1, 6), generator=g)
    right = torch.cat([s, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.randint(1, V, (1, 3), generator=g), s], 1)
    m_right = torch.tensor([[1] * 6 + [0] * 3])
    m_left = m_right.flip(1)
    alone = c(s)["logits"]
    torch.testing.assert_close(c(right, m_right)["logits"], alone, atol=1e-8, rtol=0)
    torch.testing.assert_close(c(left, m_left)["logits"], alone, atol=1e-8, rtol=0)


def test_classification_losses_follow_hugging_face():
    torch.manual_seed(0)
    ids, mask = _batch()
    reg = ChimeraTextClassifier(num_labels=1, **TINY).eval()
    y = torch.tensor([0.5, 2.0, 4.5])
    out = reg(ids, mask, labels=y)
    torch.testing.assert_close(out["loss"], F.mse_loss(out["logits"].squeeze(-1), y))
    clf = ChimeraTextClassifier(num_labels=3, **TINY).eval()
    lab = torch.tensor([0, 2, 1])
    out = clf(ids, mask, labels=lab)
    torch.testing.assert_close(out["loss"], F.cross_entropy(out["logits"], lab))


def test_presets_and_parameter_counts():
    # the paper's 110M model: 23 layers, d_model 768, d_state 64, headdim 64, expand 2, no MLP
    n_dag = approx_parameter_count(**text_preset("chimera_text_110m"), variant="dag")
    n_ug = approx_parameter_count(**text_preset("chimera_text_110m"), variant="ug")
    assert n_dag == pytest.approx(110e6, rel=0.03), n_dag  # 111.2M (separate B/C/dt per line)
    assert n_ug == pytest.approx(110e6, rel=0.03), n_ug  # 108.5M
    # App. B.3 / Table 7: 12 layers and 6 layers with expand 4 are both ~70M
    for name in ("chimera_text_70m", "chimera_text_6l_expand4"):
        n = approx_parameter_count(**text_preset(name), variant="dag")
        assert n == pytest.approx(70e6, rel=0.03), (name, n)
    with torch.device("meta"):
        enc = ChimeraTextEncoder(**text_preset("chimera_text_110m"))
        assert len(enc.layers) == 23 and enc.layers[0].mixer.nheads == 24
        enc12 = ChimeraTextEncoder(**text_preset("chimera_text_110m", headdim=128, n_layer=1))
        assert enc12.layers[0].mixer.nheads == 12  # Table 8's head count
    assert set(TEXT_PRESETS) == {"chimera_text_110m", "chimera_text_70m",
                                 "chimera_text_6l_expand4"}
    with pytest.raises(ValueError, match="unknown text preset"):
        text_preset("chimera_text_1b")


def test_bad_text_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="unknown text variant"):
        ChimeraTextEncoder(**TINY, variant="both")
    with pytest.raises(ValueError, match="UG variant needs"):
        ChimeraTextEncoder(**TINY, variant="ug", method="ssd")
    with pytest.raises(ValueError, match="unknown pooling"):
        ChimeraTextClassifier(pooling="max", **TINY)
    enc = ChimeraTextEncoder(**TINY)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        enc()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        enc(ids, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="token_type_ids must be"):
        enc(ids, token_type_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one real token"):
        ChimeraTextClassifier(**TINY)(ids, torch.zeros_like(mask))


# --- Hugging Face -------------------------------------------------------------------------
def _hf_mlm(seed=0, **kw):
    torch.manual_seed(seed)
    return ChimeraTextForMaskedLM(ChimeraTextConfig(**HF_TINY, **kw)).eval()


def test_config_and_auto_registration():
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    cfg = AutoConfig.for_model("chimera_text", **HF_TINY)
    assert type(cfg) is ChimeraTextConfig and cfg.model_type == "chimera_text"
    assert type(AutoModel.from_config(cfg)) is ChimeraTextModel
    assert type(AutoModelForMaskedLM.from_config(cfg)) is ChimeraTextForMaskedLM
    assert type(AutoModelForSequenceClassification.from_config(cfg)) is \
        ChimeraTextForSequenceClassification
    big = ChimeraTextConfig.from_preset("chimera_text_110m", variant="ug")
    assert (big.num_hidden_layers, big.hidden_size, big.headdim, big.d_conv) == (23, 768, 64, 7)
    with pytest.raises(ValueError, match="unknown variant"):
        ChimeraTextConfig(variant="both")


def test_save_pretrained_round_trips(tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    ids, mask = _batch()
    mlm = _hf_mlm(variant="ug")
    mlm.save_pretrained(tmp_path / "mlm")
    back = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert back.config.variant == "ug"
    assert back.lm_head.decoder.weight is back.chimera.encoder.embeddings.word_embeddings.weight
    torch.testing.assert_close(back(ids, mask).logits, mlm(ids, mask).logits, atol=0, rtol=0)
    base = AutoModel.from_pretrained(tmp_path / "mlm").eval()  # the MLM's encoder
    torch.testing.assert_close(base(ids, mask).last_hidden_state,
                               mlm.chimera(ids, mask).last_hidden_state, atol=0, rtol=0)

    torch.manual_seed(1)
    clf = ChimeraTextForSequenceClassification(
        ChimeraTextConfig(**HF_TINY, num_labels=3, pooling="mean")).eval()
    clf.save_pretrained(tmp_path / "clf")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    assert back.config.num_labels == 3 and back.config.pooling == "mean"
    torch.testing.assert_close(back(ids, mask).logits, clf(ids, mask).logits, atol=0, rtol=0)


def test_hf_from_pretrained_reports_exactly_the_new_and_dropped_keys(tmp_path):
    mlm = _hf_mlm()
    mlm.save_pretrained(tmp_path)
    clf, info = ChimeraTextForSequenceClassification.from_pretrained(
        tmp_path, num_labels=1, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias",
                                         "classifier.weight", "classifier.bias"}
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"lm_head"}
    assert not info["mismatched_keys"]
    for k, v in mlm.chimera.state_dict().items():
        assert torch.equal(clf.chimera.state_dict()[k], v), k
    assert clf.pooler.dense.weight.std().item() == pytest.approx(0.02, rel=0.3)  # fresh init
    ids, mask = _batch()
    out = clf(ids, mask, labels=torch.tensor([0.1, 0.5, 0.9]))
    assert clf.config.problem_type == "regression"
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1),
                                                    torch.tensor([0.1, 0.5, 0.9])))
    clf3 = ChimeraTextForSequenceClassification(ChimeraTextConfig(**HF_TINY, num_labels=3))
    lab = torch.tensor([2, 0, 1])
    out = clf3(ids, mask, labels=lab)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, lab))


def test_load_mlm_into_classifier_is_strict(tmp_path):
    mlm = _hf_mlm(seed=3)
    mlm.save_pretrained(tmp_path / "mlm")
    enc_sd = mlm.chimera.encoder.state_dict()

    def same_encoder(clf_encoder):
        return all(torch.equal(clf_encoder.state_dict()[k], v) for k, v in enc_sd.items())

    # HF dir -> HF classifier
    clf = ChimeraTextForSequenceClassification(ChimeraTextConfig(**HF_TINY, num_labels=2))
    report = load_mlm_into_classifier(clf, tmp_path / "mlm")
    assert same_encoder(clf.chimera.encoder)
    assert report["new"] == ["classifier.bias", "classifier.weight", "pooler.dense.bias",
                             "pooler.dense.weight"]
    assert report["dropped"] and all(k.startswith("lm_head.") for k in report["dropped"])
    # HF dir -> plain classifier; plain MLM state dict and a Lightning-style checkpoint -> HF
    plain = ChimeraTextClassifier(num_labels=2, **TINY)
    load_mlm_into_classifier(plain, tmp_path / "mlm")
    assert same_encoder(plain.encoder)
    torch.manual_seed(4)
    tmlm = ChimeraTextMLM(**TINY)
    clf = ChimeraTextForSequenceClassification(ChimeraTextConfig(**HF_TINY, num_labels=2))
    load_mlm_into_classifier(clf, tmlm.state_dict())
    assert torch.equal(clf.chimera.encoder.layers[1].mixer.dt_bias,
                       tmlm.encoder.layers[1].mixer.dt_bias)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tmlm.state_dict().items()}}, ckpt)
    load_mlm_into_classifier(clf, ckpt)
    assert torch.equal(clf.chimera.encoder.norm_f.weight, tmlm.encoder.norm_f.weight)

    # anything outside the allowed lists raises, and nothing is loaded
    sd = dict(mlm.state_dict())
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    broken = {k: v for k, v in sd.items() if "layers.1.mixer.D" not in k}
    with pytest.raises(ValueError, match="missing from the checkpoint.*layers.1.mixer.D"):
        load_mlm_into_classifier(clf, broken)
    with pytest.raises(ValueError, match="unexpected in the checkpoint.*extra_head.weight"):
        load_mlm_into_classifier(clf, {**sd, "extra_head.weight": torch.zeros(2)})
    other = ChimeraTextForMaskedLM(ChimeraTextConfig(**{**HF_TINY, "d_state": 4}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_mlm_into_classifier(clf, other.state_dict())
    with pytest.raises(ValueError, match="exactly one Chimera text encoder"):
        load_mlm_into_classifier(clf, {"foo.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        load_mlm_into_classifier(clf, tmp_path / "nowhere")
    assert all(torch.equal(before[k], v) for k, v in clf.state_dict().items())


def test_hf_outputs_hidden_states_and_rejects_attention_arguments():
    mlm = _hf_mlm()
    ids, mask = _batch()
    out = mlm(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + 2 blocks
    assert isinstance(mlm(ids, mask, return_dict=False), tuple)
    # packed rows pass through to the encoder
    packed = torch.cat([ids[:1, :4], ids[:1, 4:]], 1)
    out = mlm(packed, cu_seqlens=torch.tensor([0, 4, 11])).logits
    torch.testing.assert_close(out[:, :4], mlm(ids[:1, :4]).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no position_ids"):
        mlm(ids, mask, position_ids=torch.arange(11)[None])
    with pytest.raises(ValueError, match="no attention weights"):
        mlm(ids, mask, output_attentions=True)
    # nothing masked: a zero loss, not NaN (as the plain model)
    assert mlm(ids, mask, labels=torch.full_like(ids, -100)).loss.item() == 0.0
    # HF's Trainer passes extra loss kwargs only to models whose forward takes **kwargs
    import inspect

    for cls in (ChimeraTextModel, ChimeraTextForMaskedLM, ChimeraTextForSequenceClassification):
        kinds = {p.kind for p in inspect.signature(cls.forward).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds


def test_hf_module_imports_neither_lightning_nor_hydra():
    code = ("import sys, chimera.models.hf; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') "
            "if m in sys.modules]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_count_parameters_counts_tied_weights_once():
    m = ChimeraTextMLM(**TINY)
    total = sum(p.numel() for p in m.parameters())
    assert count_parameters(m) == total
    dup = sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    assert dup - total == V * 32  # the decoder's tied weight


def test_package_exports_text_models_and_hf_lazily():
    import chimera.models as models

    assert models.ChimeraTextMLM is ChimeraTextMLM
    assert models.text_preset("chimera_text_70m")["n_layer"] == 12
    assert models.ChimeraTextConfig is ChimeraTextConfig
    assert models.load_mlm_into_classifier is load_mlm_into_classifier
    assert models.load_finetuned_into_classifier is load_finetuned_into_classifier
    assert "ChimeraTextForMaskedLM" in models.__all__


def test_finetuned_classifier_starts_another_task(tmp_path):
    # Table 1: RTE / MRPC / STS-B start from the MNLI-finetuned model (3 labels -> 2 or 1)
    torch.manual_seed(5)
    mnli = ChimeraTextForSequenceClassification(ChimeraTextConfig(**HF_TINY, num_labels=3))
    mnli.save_pretrained(tmp_path / "mnli")
    stsb = ChimeraTextForSequenceClassification(ChimeraTextConfig(**HF_TINY, num_labels=1))
    report = load_finetuned_into_classifier(stsb, tmp_path / "mnli")
    assert report == {"new": ["classifier.bias", "classifier.weight"],
                      "dropped": ["classifier.bias", "classifier.weight"]}
    assert torch.equal(stsb.pooler.dense.weight, mnli.pooler.dense.weight)
    for k, v in mnli.chimera.state_dict().items():
        assert torch.equal(stsb.chimera.state_dict()[k], v), k
    assert stsb.classifier.weight.shape == (1, 32)
    # into the plain classifier too; an MLM has no pooler, so it cannot stand in for MNLI
    plain = ChimeraTextClassifier(num_labels=2, **TINY)
    load_finetuned_into_classifier(plain, tmp_path / "mnli")
    assert torch.equal(plain.pooler.dense.bias, mnli.pooler.dense.bias)
    with pytest.raises(ValueError, match="missing from the checkpoint.*pooler.dense"):
        load_finetuned_into_classifier(plain, _hf_mlm().state_dict())
