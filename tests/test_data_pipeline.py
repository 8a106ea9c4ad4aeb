"""The Grain pipeline: batch contract per task, exact resume, per-process sharding, bad data,
mixing, global arrays."""


import jax
import numpy as np
import pytest

from mplug2_jax.data import text as text_lib
from mplug2_jax.data import default_data_config, demo, pipeline, records
from mplug2_jax.data.bad_data import TooManyBadSamples

VOCABS = [str(text_lib.BERT_VOCAB_FILE)]  # shipped with the package

MODEL = {"name": "mplug2", "task": "videoqa", "num_frames": 4, "image_size": 32}


def model_cfg(task):
  import ml_collections
  return ml_collections.ConfigDict(dict(MODEL, task=task))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  return demo.make_demo(str(root), num_train=16, num_test=5, size=32, frames=8,
                        log=lambda *_: None)


def config(paths, **kw):
  d = default_data_config()
  d.vocab_file = VOCABS[0]
  d.mixture = tuple((p, 1.0) for p in paths)
  for k, v in kw.items():
    d[k] = v
  return d


def it(d, task="videoqa", split="train", batch=4, index=0, count=1, seed=0, **kw):
  return pipeline.make_iterator(d, split=split, batch_size=batch, model_cfg=model_cfg(task),
                                process_index=index, process_count=count, seed=seed, **kw)


def take(iterator, n):
  out = []
  for _ in range(n):
    b = next(iterator)
    out.append((b, [m["id"] for m in iterator.last_meta]))
  return out


def assert_same(a, b):
  for (ba, ia), (bb, ib) in zip(a, b):
    assert ia == ib
    assert ba.keys() == bb.keys()
    for k in ba:
      np.testing.assert_array_equal(ba[k], bb[k], err_msg=k)


# ---- the batch contract: the model family's batch schema ---------------------------


def test_videoqa_batch(data):
  d = config([data["video_qa"]], answers_per_question=2)
  b = next(it(d))
  assert b["video"].shape == (4, 4, 32, 32, 3) and b["video"].dtype == np.float32
  assert b["text_ids"].shape == b["text_mask"].shape == (4, 50)
  assert b["answer_ids"].shape == b["answer_labels"].shape == (8, 10)
  np.testing.assert_array_equal(b["answer_question_index"], [0, 0, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(b["answer_weights"], [1, 0] * 4)
  assert (b["answer_labels"][1::2] == -100).all() and (b["answer_mask"][1::2].sum(1) == 2).all()
  assert (b["text_ids"][:, 0] == 101).all() and (b["valid"] == 1).all()
  assert all(x.dtype == np.int32 for k, x in b.items() if k not in ("video", "answer_weights"))
  # CLIP normalisation of pixel values in [0, 255] (RandAugment fill 128 included).
  lo, hi = (0 - 0.4815) / 0.2686, (1 - 0.4082) / 0.2613
  assert lo - 0.01 <= b["video"].min() and b["video"].max() <= hi + 0.01


def test_caption_and_retrieval_batches(data):
  b = next(it(config([data["video_caption"]]), "caption"))
  assert b["caption_ids"].shape == b["caption_labels"].shape == (4, 20)
  assert (b["caption_labels"][:, :3] == -100).all() and (b["caption_labels"][:, 3] == 1997).all()
  b = next(it(config([data["video_retrieval"]]), "retrieval"))
  assert b["text_ids"].shape == (4, 30) and b["image_ids"].shape == (4,)


def test_pretrain_lm_targets_are_prompted_captions_ending_with_sep(data):
  """Prefix-LM targets as the captioning task encodes them (M2 `video_caption_mplug2.py`):
  prompt masked, caption, [SEP] (102) as the last target; "text" keeps [CLS] text only."""
  b = next(it(config([data["video_retrieval"]], task="pretrain", max_caption_len=30),
              "pretrain"))
  labels = b["caption_labels"]
  assert labels.shape == (4, 30) and (labels[:, :3] == -100).all()
  for row, mask in zip(labels, b["caption_mask"]):
    assert row[mask.sum() - 1] == 102 and (row[3:mask.sum()] != -100).all()
  b = next(it(config([data["video_retrieval"]], task="pretrain", pretrain_lm_targets="text"),
              "pretrain"))
  assert "caption_ids" not in b


def test_raw_questions_keep_their_case_and_punctuation(data):
  """question_preprocess="raw" (M1 VQA): the question is tokenized as given; the BERT
  uncased tokenizer still lower-cases, but "?" stays a token (pre_question drops it)."""
  ids = [next(it(config([data["video_qa"]], question_preprocess=p)))["text_ids"]
         for p in ("pre_question", "raw")]
  qmark = 1029  # "?" in the uncased vocabulary
  assert not (ids[0] == qmark).any() and (ids[1] == qmark).any()


@pytest.mark.parametrize("task,dataset", [
    ("caption", "video_caption"), ("videoqa", "video_qa"), ("retrieval", "video_retrieval"),
    ("pretrain", "video_retrieval"), ("classification", "video_classification"),
    ("text", "video_retrieval")])
def test_batches_follow_the_family_schema(data, task, dataset):
  """Every array the pipeline yields is in the schema with its shape and dtype, and every
  schema array is yielded: the schema is the one statement of a task's batch."""
  from mplug2_jax.models import mplug2, schema

  d = config([data[dataset]], answers_per_question=2, task=task)
  batch = next(it(d, task if task != "text" else "pretrain", batch=4))
  fields = mplug2.batch_schema(model_cfg(task if task != "text" else "pretrain"), d, 4)
  schema.check_batch(fields, batch, what=f"the {task} batch")
  with pytest.raises(ValueError, match="'valid' is int32"):
    schema.check_batch(fields, {**batch, "valid": batch["valid"][:1]})


def test_batch_fits_the_model(data):
  from mplug2_jax import experiment
  from mplug2_jax.models import mplug2

  cfg = experiment.base_config("tiny", "videoqa").model
  d = config([data["video_qa"]], answers_per_question=2, max_question_len=8, max_answer_len=6,
             num_frames=cfg.get("num_frames", 4), image_size=cfg.get("image_size", 32))
  batch = next(it(d, batch=2))
  model = mplug2.build(cfg)
  inputs = {k: v for k, v in batch.items() if k not in ("valid", "question_id",
                                                         "answer_labels", "answer_weights")}
  out, _ = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.key(0), inputs), inputs))
  assert out["logits"].shape[:2] == (4, 6)


# ---- determinism and exact resume ---------------------------------------------------


def test_exact_resume_in_process(data):
  d = config([data["video_qa"]])
  ref = take(it(d), 8)  # 48 records / 4 = 12 batches an epoch
  a = it(d)
  take(a, 5)
  state = a.get_state()
  b = it(d)
  b.set_state(state)
  assert_same(take(b, 3), ref[5:8])
  assert_same(take(a, 3), ref[5:8])
  # A different seed gives a different order and augmentation.
  assert take(it(d, seed=1), 1)[0][1] != ref[0][1]


def test_epochs_reshuffle_and_cover(data):
  d = config([data["video_caption"]], randaug=False)
  ids = [i for _, batch in take(it(d, "caption"), 8) for i in batch]  # 2 epochs of 16
  assert sorted(ids[:16]) == sorted(ids[16:]) and len(set(ids[:16])) == 16
  assert ids[:16] != ids[16:]


@pytest.mark.slow  # ~20 s: starts Grain worker processes twice
def test_exact_resume_with_worker_processes(data):
  d = config([data["video_caption"]])
  ref = take(it(d, "caption"), 6)
  d.num_workers = 2
  a = it(d, "caption")
  assert_same(take(a, 3), ref[:3])  # workers give the same batches as in-process
  state = a.get_state()
  a.close()
  b = it(d, "caption")
  b.set_state(state)
  assert_same(take(b, 3), ref[3:6])
  b.close()


# ---- multi-process sharding ---------------------------------------------------------


def test_two_processes_train_disjoint(data):
  d = config([data["video_caption"]])
  per = [[i for _, ids in take(it(d, "caption", batch=4, index=p, count=2), 4) for i in ids]
         for p in range(2)]  # 2 examples per process per batch, 8 = one epoch of a half
  assert set(per[0]).isdisjoint(per[1]) and len(set(per[0]) | set(per[1])) == 16


def test_two_processes_eval_each_item_once(data):
  d = config([data["video_caption"]])
  seen, counts = [], []
  for p in range(2):
    batches = list(it(d, "caption", split="test", batch=4, index=p, count=2))
    counts.append(len(batches))
    for b in batches:
      assert b["video"].shape[0] == 2
  for p in range(2):
    iterator = it(d, "caption", split="test", batch=4, index=p, count=2)
    for b in iterator:
      seen += [m["id"] for m, v in zip(iterator.last_meta, b["valid"]) if v]
  assert counts[0] == counts[1] == 2  # 5 items -> 3 and 2 per process -> 2 batches of 2
  assert sorted(seen) == sorted(f"demo_test_{i:05d}" for i in range(5))


def test_answer_index_is_global_on_process_1(data):
  b = next(it(config([data["video_qa"]]), batch=4, index=1, count=2))
  np.testing.assert_array_equal(b["answer_question_index"], [2, 3])


def test_global_arrays(data):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = np.array(jax.devices())
  mesh = Mesh(devices, ("data",))
  n = len(devices)
  sharding = NamedSharding(mesh, P("data"))
  b = next(it(config([data["video_qa"]]), batch=4 * n, sharding=sharding))
  assert isinstance(b["video"], jax.Array) and b["video"].shape == (4 * n, 4, 32, 32, 3)
  assert b["video"].sharding == sharding
  import ml_collections

  rules_cfg = ml_collections.ConfigDict({"sharding_rules": (("activation_batch", ("data",)),),
                                         "mesh": {"axes": ("data",)}})
  from mplug2_jax import sharding as sharding_lib
  assert sharding_lib.batch_sharding(mesh, rules_cfg).spec == P(("data",))


# ---- mixing -------------------------------------------------------------------------


def test_mixture_by_weight(data):
  d = config([data["video_retrieval"], data["image_text"]], repeat_images=True)
  d.mixture = ((data["video_retrieval"], 3.0), (data["image_text"], 1.0))
  iterator = it(d, "retrieval", batch=8)
  sources = []
  for _ in range(4):
    next(iterator)
    sources += ["image" in m["source"] for m in iterator.last_meta]
  assert sum(sources) == 8  # exactly one in four from the weight-1 source
  d.repeat_images = False
  with pytest.raises(ValueError, match="repeat_images"):
    next(it(d, "retrieval", batch=8))


# ---- bad data -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dataset(data, tmp_path_factory):
  """12 good caption records and one of each kind of bad sample."""
  good = records.RecordSource(data["video_caption"], "train")
  mp4 = good[0]["media"]
  recs = [dict(id=f"good{i}", media=good[i]["media"], media_format="mp4",
               texts=[b"a red circle moves"]) for i in range(12)]
  recs += [
      dict(id="bad_corrupt", media=b"\x00" * 300, media_format="mp4", texts=[b"x y"]),
      dict(id="bad_empty", media=b"", media_format="mp4", texts=[b"x y"]),
      dict(id="bad_truncated", media=mp4[:len(mp4) // 2], media_format="mp4", texts=[b"x y"]),
      dict(id="bad_utf8", media=mp4, media_format="mp4", texts=[b"\xff\xfe caption"]),
      dict(id="bad_text", media=mp4, media_format="mp4", texts=[b"?!."]),
      dict(id="bad_image", media=b"notajpeg", media_format="jpeg", texts=[b"x y"]),
  ]
  out = tmp_path_factory.mktemp("bad")
  return records.write(str(out), "video_caption", {"train": lambda: recs, "test": lambda: recs})


def test_bad_samples_replaced_and_counted(bad_dataset):
  d = config([bad_dataset], max_bad_fraction=0.5, bad_min_samples=0)
  iterator = it(d, "caption", batch=6)
  ids = []
  for _ in range(3):  # 18 examples = one epoch of 18 records
    b = next(iterator)
    assert b["video"].shape == (6, 4, 32, 32, 3)
    ids += [m["id"] for m in iterator.last_meta]
  assert all(i.startswith("good") for i in ids)
  m = iterator.metrics()
  assert m["data/bad/total"] == 6
  assert m["data/bad/empty"] == 1
  # corrupt mp4 + corrupt jpeg + cut mp4 (its index is at the end: it may not even open).
  assert m["data/bad/truncated"] + m["data/bad/corrupt"] == 3
  assert m["data/bad/bad_text"] == 1 and m["data/bad/empty_text"] == 1
  # Deterministic replacement: same ids again, and the counts survive a resume.
  again = it(d, "caption", batch=6)
  assert [i for _ in range(3) for i in (next(again), [x["id"] for x in again.last_meta])[1]] == ids
  state = iterator.get_state()
  resumed = it(d, "caption", batch=6)
  resumed.set_state(state)
  assert resumed.metrics() == m


def test_bad_samples_invalid_in_eval(bad_dataset):
  d = config([bad_dataset], max_bad_fraction=0.5, bad_min_samples=0)
  iterator = it(d, "caption", split="test", batch=6)
  valid = np.concatenate([b["valid"] for b in iterator])
  assert valid.sum() == 12 and len(valid) == 18


def test_too_many_bad_samples_names_records(bad_dataset):
  d = config([bad_dataset], max_bad_fraction=0.1, bad_min_samples=0)
  with pytest.raises(TooManyBadSamples, match=r"(?s)max_bad_fraction 10.0%.*bad_"):
    for _ in range(3):
      next(it(d, "caption", batch=6))
