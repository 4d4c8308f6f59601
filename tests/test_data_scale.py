"""Data at scale: trained / local tokenizers, file and save_to_disk sources, the memory-mapped token store."""

import dataclasses
import json
import math
import os
import time

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from efficient_attn import cli  # noqa: E402
from efficient_attn.config import (Config, ConfigError, DataConfig, MeshConfig, ModelConfig,  # noqa: E402
                                   TrainConfig, resolve_vocab, validate)
from efficient_attn.data import pipeline, sources, store as store_lib, tokenizer as tok_lib  # noqa: E402
from efficient_attn.data.text import DataError, PackedStream, split_documents  # noqa: E402

WORDS = "the of attention linear kernel token sparse memory query key value softmax model batch layer".split()


def make_docs(n=24, seed=0):
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(WORDS, int(rng.integers(80, 300)))) + f"\nend of document {i} é\n" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A directory of text files (one document each; one in a subdirectory) and its documents in file order."""
  root = tmp_path_factory.mktemp("corpus")
  docs = make_docs()
  for i, d in enumerate(docs):
    sub = root / "more" if i == 5 else root
    sub.mkdir(exist_ok=True)
    (sub / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")
  order = sorted((str(root / "more" / "doc05.txt") if i == 5 else str(root / f"doc{i:02d}.txt"), d)
                 for i, d in enumerate(docs))
  return str(root), [d for _, d in order]


def open_store(d):
  """The token store of `d`: the pipeline's steps 1-4 without the streams."""
  source = sources.resolve(d)
  return store_lib.open_store(d, source, tok_lib.get_tokenizer(d, source))


def docs_of(store, split, tok):
  tokens, offsets = store.arrays(split)
  return [tok.decode(tokens[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]


def test_directory_store_packs_like_packed_stream_and_is_reused(corpus, tmp_path, monkeypatch):
  root, docs = corpus
  d = DataConfig(name="text", files=root, cache_dir=str(tmp_path), val_fraction=0.2)
  store = open_store(d)
  train, val = split_documents(docs, 0.2)
  assert store.meta["splits"]["train"]["docs"] == len(train) and store.meta["splits"]["validation"]["docs"] == len(val)
  tok = tok_lib.get_tokenizer(d)
  assert docs_of(store, "train", tok) == [b.decode() for b in train]
  # The pipeline's memory-mapped streams yield exactly PackedStream's batches (epochs and process shards included;
  # validation seeded seed + 1).
  batches = pipeline(d, seq_len=31, batch_size=4, seed=3)
  assert batches.store.path == store.path and batches.token_bytes.shape == (256,)
  for a, b in ((PackedStream(train, 31, 4, seed=3), batches.train), (PackedStream(val, 31, 4, seed=4),
                                                                     batches.validation)):
    for i in (0, 1, a.batches_per_epoch, 2 * a.batches_per_epoch + 1):
      for shard in ((0, 1), (1, 2)):
        x, y = a.batch(i, *shard), b.batch(i, *shard)
        for k in x:
          np.testing.assert_array_equal(x[k], y[k])
  # A second open maps the built store: nothing is tokenized again.
  monkeypatch.setattr(store_lib.build, "build", lambda *a, **k: pytest.fail("rebuilt a cached store"))
  assert open_store(d).path == store.path
  monkeypatch.undo()
  # A changed file (size / mtime) is another store.
  with open(os.path.join(root, "doc00.txt"), "a", encoding="utf-8") as f:
    f.write("one more line\n")
  try:
    assert open_store(d).path != store.path
  finally:
    with open(os.path.join(root, "doc00.txt"), "w", encoding="utf-8") as f:
      f.write(docs[0])


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_and_counts_bytes(corpus, tmp_path, kind):
  root, docs = corpus
  d = DataConfig(name="text", files=root, cache_dir=str(tmp_path), tokenizer=f"{kind}:300", val_fraction=0.0)
  store = open_store(d)
  saved = os.listdir(tmp_path / "tokenizers")
  assert len(saved) == 1 and saved[0].startswith(f"{kind}-300-")
  tok = tok_lib.get_tokenizer(d)
  assert tok.vocab_size <= 300 and store.meta["dtype"] == "uint16"
  assert docs_of(store, "train", tok) == docs
  tokens, _ = store.arrays("train")
  s = store.meta["splits"]["train"]
  assert s["tokens"] < s["bytes"] and store.token_bytes()[np.asarray(tokens)].sum() == s["bytes"]
  assert tok_lib.get_tokenizer(d).fingerprint == tok.fingerprint  # loaded from the cache, not retrained


def test_local_tokenizer_file_and_directory(corpus, tmp_path):
  root, _ = corpus
  trained = tok_lib.get_tokenizer(DataConfig(name="text", files=root, cache_dir=str(tmp_path), tokenizer="bpe:280"))
  (tmp_path / "tok").mkdir()
  trained.tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  for spec in (str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
    d = DataConfig(name="text", files=root, cache_dir=str(tmp_path), tokenizer=spec)
    assert tok_lib.get_tokenizer(d).fingerprint == trained.fingerprint
    cfg = resolve_vocab(Config(data=d))
    assert cfg.model.vocab_size == trained.vocab_size  # follows the tokenizer
    with pytest.raises(ConfigError, match=f"model.vocab_size=260 is smaller than the {trained.vocab_size} tokens"):
      resolve_vocab(Config(model=ModelConfig(vocab_size=260), data=d))


def test_parquet_and_save_to_disk_sources(corpus, tmp_path):
  import datasets

  _, docs = corpus
  ds = datasets.Dataset.from_dict({"body": docs, "n": list(range(len(docs)))})
  (tmp_path / "pq").mkdir()
  ds.to_parquet(str(tmp_path / "pq" / "part0.parquet"))
  d = DataConfig(name="parquet", files=str(tmp_path / "pq"), text_field="body", cache_dir=str(tmp_path / "c"),
                 val_fraction=0.0)
  assert docs_of(open_store(d), "train", tok_lib.get_tokenizer(d)) == docs
  datasets.DatasetDict({"train": ds.select(range(20)), "validation": ds.select(range(20, 24))}).save_to_disk(
      str(tmp_path / "saved"))
  d = DataConfig(name=str(tmp_path / "saved"), text_field="body", validation_split="validation",
                 cache_dir=str(tmp_path / "c"))
  store = open_store(d)
  assert docs_of(store, "train", tok_lib.get_tokenizer(d)) == docs[:20]
  assert docs_of(store, "validation", tok_lib.get_tokenizer(d)) == docs[20:]


def test_clear_errors(corpus, tmp_path):
  import datasets

  root, docs = corpus
  base = DataConfig(name="text", files=root, cache_dir=str(tmp_path))
  with pytest.raises(DataError, match="no tokenizer file at"):
    open_store(dataclasses.replace(base, tokenizer=str(tmp_path / "missing.json")))
  for model, data, match in ((ModelConfig(vocab_size=100), base, "vocab_size=100 is smaller than the 256 tokens"),
                             (ModelConfig(vocab_size=300), dataclasses.replace(base, tokenizer="bpe:1000"),
                              "vocab_size=300 is smaller than the 1000 tokens"),
                             (ModelConfig(), dataclasses.replace(base, tokenizer="bpe:100"), "at least 260")):
    with pytest.raises(ConfigError, match=match):
      validate(Config(model=model, data=data, mesh=MeshConfig(data=1)), 1)
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "saved"))
  with pytest.raises(DataError, match=r"data.split='nope' is not a split .* splits are \['train'\]"):
    open_store(dataclasses.replace(base, name=str(tmp_path / "saved"), split="nope"))
  (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
  with pytest.raises(DataError, match="could not read parquet data"):
    open_store(dataclasses.replace(base, name="parquet", files=str(tmp_path / "bad.parquet")))
  t0 = time.perf_counter()
  with pytest.raises(DataError, match="hub is unreachable"):
    open_store(dataclasses.replace(base, name="no_such_user/no_such_dataset", config="x"))
  assert time.perf_counter() - t0 < 5  # offline: no retries
  assert not [p for p in os.listdir(tmp_path / "stores") if ".tmp-" in p]  # failed builds leave nothing


def test_num_proc_builds_the_same_store(corpus, tmp_path):
  """The same store for any num_proc, and the workers are not forks of this (JAX-threaded) process."""
  import warnings

  import jax

  jax.devices()  # JAX's threads are running: a fork now would warn (and may deadlock)
  root, _ = corpus
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    one, two, three = (open_store(DataConfig(name="text", files=root, cache_dir=str(tmp_path / str(n)),
                                                       tokenizer="bytes", val_fraction=0.2, num_proc=n))
                       for n in (1, 2, 3))
  assert not [w for w in caught if "fork" in str(w.message)], [str(w.message) for w in caught]
  assert one.meta["splits"] == two.meta["splits"] == three.meta["splits"]
  for split in ("train", "validation"):
    for a, b, c in zip(one.arrays(split), two.arrays(split), three.arrays(split)):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)


def test_a_failing_tokenizing_worker_is_one_sentence(corpus, tmp_path):
  root, _ = corpus
  bad = tmp_path / "bad"
  bad.mkdir()
  for i in range(4):
    (bad / f"{i}.json").write_text('{"text": "ok"}\n' if i != 2 else '{"text": ', encoding="utf-8")
  with pytest.raises(DataError, match="tokenizing worker"):
    open_store(DataConfig(name="json", files=str(bad), cache_dir=str(tmp_path / "c"), num_proc=2))
  assert [p for p in os.listdir(tmp_path / "c" / "stores")] == []


def test_killed_build_leaves_no_store(corpus, tmp_path, monkeypatch):
  from efficient_attn.data import tokenizer

  root, _ = corpus
  d = DataConfig(name="text", files=root, cache_dir=str(tmp_path))
  monkeypatch.setattr(tokenizer.ByteTokenizer, "encode_batch", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
  with pytest.raises(KeyboardInterrupt):
    open_store(d)
  assert [p for p in os.listdir(tmp_path / "stores")] == []


def test_cli_refuses_a_vocab_below_the_bytes(capsys, tmp_path):
  assert cli.main(["train", "--workdir", str(tmp_path / "w"), "--set", "model.vocab_size=100"]) == 2
  assert "model.vocab_size=100 is smaller than the 256 tokens" in capsys.readouterr().err


def test_bpe_run_resumes_exactly_and_reports_bits_per_byte(corpus, tmp_path):
  import jax

  from efficient_attn.train import train

  root, _ = corpus
  cfg = Config(model=ModelConfig(num_layers=1, d_model=32, num_heads=2, ffn_dim=64,
                                 attention_options={"implementation": "xla"}),
               train=TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, log_every=2, checkpoint_every=3,
                                 eval_batches=1, eval_every=2),
               data=DataConfig(name="text", files=root, tokenizer="bpe:300", cache_dir=str(tmp_path / "c"),
                               val_fraction=0.2),
               mesh=MeshConfig(data=1))
  dev = jax.devices()[:1]
  full = train(cfg, str(tmp_path / "full"), devices=dev)
  train(cfg, str(tmp_path / "cut"), devices=dev, stop_after=4)
  train(cfg, str(tmp_path / "cut"), devices=dev)

  def rows(w):
    with open(tmp_path / w / "metrics.jsonl") as f:
      return [json.loads(line) for line in f]

  for key in ("loss", "val_loss"):
    a, b = [r[key] for r in rows("full") if key in r], [r[key] for r in rows("cut") if key in r]
    np.testing.assert_allclose(b[-len(a):] if len(b) > len(a) else b, a, atol=1e-5)
  last = [r for r in rows("full") if "val_loss" in r][-1]
  assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
  assert 0 < last["val_bpb"] < last["val_loss"] / math.log(2)  # a BPE token stands for more than one byte
  assert full["val_bpb"] == pytest.approx(last["val_bpb"])
  with open(tmp_path / "full" / "config.json") as f:
    assert json.load(f)["model.vocab_size"] == 300
