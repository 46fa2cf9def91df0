"""Model directories: round trip, the HF "pldrllm" and reference .pth imports, configs, bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from pldr_core.checkpoint import fingerprint, load_model, save_model, state_dict_for_save
from pldr_core.config import PLDRConfig, preset
from pldr_core.errors import PLDRError
from pldr_core.model import PLDRModel

TOKENS = torch.randint(4, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("g_mode", ["learned", "identity", "random"])
def test_save_load_round_trip_reproduces_logits(tmp_path, g_mode):
    model = tiny_model(g_mode, dtype=torch.float32)
    save_model(model, tmp_path / "m", meta={"steps": 7})
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["steps"] == 7
    assert fingerprint(loaded) == fingerprint(model)


def test_saved_tensor_names_follow_the_reference_layout(tmp_path, golden_dir):
    model = PLDRModel(preset("tiny", vocab_size=64))
    save_model(torch.compile(model), tmp_path / "m")  # a compiled wrapper must not leak _orig_mod.
    names = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert "decoder.dec_layers.0.mha1.plgatt_layer.Wlst" in names
    assert "decoder.dec_layers.1.mha1.reslayerAs.1.denseAs.1.gluw3.bias" in names
    assert not any("_orig_mod" in n for n in names)
    # exactly the reference's names for the same shape of model (golden: written by the reference)
    golden = set(load_file(str(golden_dir / "model.safetensors")))
    assert golden == set(PLDRModel(PLDRConfig(vocab_size=300, num_layers=2, d_model=64, num_heads=4, dff=170, A_dff=40,
                                              num_reslayerA=2, num_denseA=2)).state_dict())


def _write_hf_config(folder, cfg, **fields):
    """A HF ``PldrllmConfig`` JSON (its field names) for a model of config ``cfg``."""
    (folder / "config.json").write_text(json.dumps({
        "model_type": "pldrllm", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.dff, "max_position_embeddings": cfg.max_seq_len, **fields}))


def test_hf_layout_import_reproduces_logits(tmp_path):
    model = tiny_model("learned", dtype=torch.float32)
    cfg = model.config
    hf = tmp_path / "hf"
    hf.mkdir()
    _write_hf_config(hf, cfg, A_dff=cfg.A_dff, num_reslayerA=cfg.num_reslayerA, num_denseA=cfg.num_denseA,
                     reference_rope=True, custom_G_type=None, rope_theta=10000.0, layer_norm_eps=1e-6,
                     eos_token_id=3)
    save_file(state_dict_for_save(model), str(hf / "model.safetensors"))
    loaded = load_model(hf)
    assert loaded.config.rope_style == "interleaved" and loaded.config.g_mode == "learned"
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_hf_layout_with_predefined_g_imports_as_fixed(tmp_path):
    model = tiny_model("identity", dtype=torch.float32)
    cfg = model.config
    hf = tmp_path / "hf"
    hf.mkdir()
    _write_hf_config(hf, cfg, reference_rope=False, custom_G_type="external")
    G = torch.randn(cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    past = torch.zeros(cfg.num_layers, 3, 1, cfg.num_heads, cfg.head_dim, cfg.head_dim)
    past[:, 2, 0] = G
    sd = state_dict_for_save(model)
    sd["decoder.past_G_values"] = past
    save_file(sd, str(hf / "model.safetensors"))
    loaded = load_model(hf)
    assert loaded.config.g_mode == "fixed" and loaded.config.rope_style == "half"
    assert torch.equal(loaded.decoder.dec_layers[1].mha1.G_LM, G[1])


def test_reference_pth_import_reproduces_logits(tmp_path):
    model = tiny_model("learned", dtype=torch.float32)
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "model_state_dict": sd, "step": 5}, tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth")
    c, lc = model.config, loaded.config
    assert (lc.num_layers, lc.d_model, lc.num_heads, lc.dff, lc.A_dff, lc.num_reslayerA, lc.num_denseA) == (
        c.num_layers, c.d_model, c.num_heads, c.dff, c.A_dff, c.num_reslayerA, c.num_denseA)
    assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_paper_110m_parameter_counts():
    with torch.device("meta"):
        assert PLDRModel(preset("paper-110m")).num_params() == 109_689_362
        assert PLDRModel(preset("paper-110m", g_mode="identity")).num_params() == 105_606_482


def test_config_json_round_trip_and_defaults(tmp_path):
    cfg = preset("small", g_mode="random", dag=(0.1, 0.0, 0.2), rope_style="half")
    cfg.to_json(tmp_path / "c.json")
    assert PLDRConfig.from_json(tmp_path / "c.json") == cfg
    old = {"vocab_size": 100, "num_layers": 1, "d_model": 16, "num_heads": 2, "A_dff": 8, "num_reslayerA": 1,
           "num_denseA": 1, "max_seq_len": 32}  # an older config: shape only
    cfg2 = PLDRConfig.from_dict(old)
    assert cfg2.g_mode == "learned" and cfg2.dff == 42 and cfg2.head_dim == 8


@pytest.mark.parametrize("bad,match", [
    ({"g_mode": "banana"}, "unknown g_mode"),
    ({"rope_style": "spiral"}, "unknown rope_style"),
    ({"d_model": 30, "num_heads": 4}, "divisible"),
    ({"num_layers": 0}, "positive integer"),
])
def test_config_validation(bad, match):
    with pytest.raises(PLDRError, match=match):
        PLDRConfig.from_dict({**preset("tiny").to_dict(), "vocab_size": 10, "d_model": 32, "num_heads": 2,
                              **bad})


def test_corrupt_and_mismatched_weights_are_user_errors(tmp_path):
    model = tiny_model("learned", dtype=torch.float32)
    save_model(model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PLDRError, match="not a readable safetensors"):
        load_model(tmp_path / "m")
    save_model(model, tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PLDRError, match="shape"):
        load_model(tmp_path / "m2")
    with pytest.raises(PLDRError, match="not found"):
        load_model(tmp_path / "nope")


def test_pickle_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model_state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(PLDRError, match="weights-only"):
        load_model(tmp_path / "evil.pth")
