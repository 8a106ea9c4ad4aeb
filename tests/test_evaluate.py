"""Evaluation: metric implementations against hand-computed and pycocoevalcap reference
values; every task evaluator end to end on demo data with tiny random weights (plumbing,
output formats, each example counted exactly once with eval padding and two processes)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mplug2_jax.data import text as text_lib
from mplug2_jax.evaluate import common, metrics

VOCABS = [str(text_lib.BERT_VOCAB_FILE)]  # shipped with the package
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap's PTB tokenizer and METEOR need Java")


# ---- captioning metrics -------------------------------------------------------------


@needs_java
def test_caption_bleu_by_hand_and_against_pycocoevalcap_scorers():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

  preds = {1: "a man is playing a guitar", 2: "a dog runs on the beach", 3: "a woman cooks",
           4: "The cat sat on the mat.", 5: "a red ball on the grass"}
  refs = {1: ["A man plays the guitar.", "someone is playing guitar"],
          2: ["a dog is running on a beach", "the puppy runs in the sand"],
          3: ["a woman is cooking food", "a lady cooks in a kitchen"],
          4: ["the cat sat on a mat"], 5: ["A red ball on the grass."]}
  ours = metrics.caption_metrics(preds, refs, per_item=True)
  assert ours["num"] == 5
  # Item 4 by hand, equal lengths (no brevity penalty): unigrams 5/6 match ("the" clipped
  # at 1 in the reference), bigrams 3/5: BLEU-1 = 5/6, BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2).
  # Item 5 is perfect: BLEU-4 = ROUGE-L = 1. Items are in sorted-id order.
  item = {k: dict(zip(sorted(preds, key=str), v)) for k, v in ours["per_item"].items()}
  assert item["Bleu_1"][4] == pytest.approx(5 / 6, abs=1e-6)
  assert item["Bleu_2"][4] == pytest.approx(0.5 ** 0.5, abs=1e-6)
  assert item["Bleu_4"][5] == pytest.approx(1.0, abs=1e-6)
  assert item["ROUGE_L"][5] == pytest.approx(1.0)
  # The corpus scores equal pycocoevalcap's own scorers on its PTB tokenisation.
  tok = PTBTokenizer()
  gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
  res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  for n in range(4):
    assert ours[f"Bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-9)
  assert ours["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0], abs=1e-6)
  assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-9)
  assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
  with pytest.raises(ValueError, match="different ids"):
    metrics.caption_metrics({"a": "x"}, {"b": ["x"]})


def test_strip_prompt_keeps_text_after_last_prompt():
  assert metrics.strip_prompt("a video of a video of a man sings", "a video of") == "a man sings"
  assert metrics.strip_prompt("a man sings", "a video of") == "a man sings"
  assert metrics.strip_prompt(" x ", "") == "x"


# ---- question answering -------------------------------------------------------------


def test_vqa_answer_normalisation():
  n = metrics.normalize_vqa_answer
  assert n("Two") == "2"
  assert n("a dog") == "dog"
  assert n("The  Dogs!") == "dogs"
  assert n("dont know") == "don't know"
  assert n("yes.") == "yes"
  assert n("3.5") == "3.5"
  assert n("5.") == "5"  # the script's pattern is a lookahead: a period before no digit goes
  assert n("1,000") == "1000"
  assert n("black/white") == "black white"
  assert n("were") == "were"  # ordinary words are not taken for contractions


def test_vqa_accuracy_by_hand():
  golds = ["red"] * 2 + ["blue"] * 8
  # "red": leaving out one of the 2 "red" -> 1/3 (2 subsets), else 2/3 (8): mean 0.6.
  assert metrics.vqa_score("red", golds) == pytest.approx(0.6)
  assert metrics.vqa_score("Red!", golds) == pytest.approx(0.6)  # normalised (disagreement)
  assert metrics.vqa_score("blue", golds) == pytest.approx(1.0)
  assert metrics.vqa_score("green", golds) == 0.0
  # M1's vqaEval (the default): the prediction is always normalised ("two" -> "2"); the
  # golds' punctuation only when they disagree (unanimous "yes." stays "yes."), and the
  # golds are never lower-cased.
  assert metrics.vqa_score("two", ["2"] * 10) == 1.0
  assert metrics.vqa_score("yes", ["yes."] * 10) == 0.0
  assert metrics.vqa_score("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)
  assert metrics.vqa_score("yes", ["Yes."] * 9 + ["no"]) == 0.0
  # The original VQA API order: nothing normalised when the golds agree.
  assert metrics.vqa_score("two", ["2"] * 10, normalization="disagree") == 0.0
  assert metrics.vqa_score("two", ["2"] * 9 + ["3"], normalization="disagree") == 1.0
  # Full normalisation on both sides.
  assert metrics.vqa_score("yes", ["yes."] * 10, normalization="full") == 1.0
  with pytest.raises(ValueError, match="vqa_normalization"):
    metrics.vqa_score("x", ["x"], normalization="bad")
  assert metrics.vqa_score("two", ["two"] * 3 + ["2"] * 7) == pytest.approx(1.0)
  # Three matches out of 10: 7 subsets keep 3 (-> 1), 3 subsets keep 2 (-> 2/3): 0.9.
  assert metrics.vqa_score("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
  acc = metrics.vqa_accuracy(["red", "blue"], [golds, golds])
  assert acc == pytest.approx(80.0)


def test_exact_match_accuracy_is_plain_string_equality():
  assert metrics.exact_match_accuracy(["a", "b", "c"], ["a", "B", "c "]) == pytest.approx(100 / 3)
  assert metrics.exact_match_accuracy({1: "x", 2: "y"}, {2: "y", 1: "z"}) == 50.0
  assert metrics.exact_match_accuracy(["x"], [["y", "x"]]) == 100.0
  with pytest.raises(ValueError):
    metrics.exact_match_accuracy(["a"], ["a", "b"])


# ---- retrieval ----------------------------------------------------------------------


def test_retrieval_metrics_by_hand():
  scores = np.array([[0.9, 0.1, 0.2],    # text 0 (video 0): rank 1
                     [0.3, 0.5, 0.4],    # text 1 (video 0): rank 3
                     [0.1, 0.2, 0.8],    # text 2 (video 1): rank 2
                     [0.7, 0.6, 0.5]])   # text 3 (video 2): rank 3
  m = metrics.retrieval_metrics(scores, np.array([0, 0, 1, 2]))
  assert m["t2v_R1"] == 25.0 and m["t2v_R5"] == 100.0 and m["t2v_R10"] == 100.0
  assert m["t2v_MedR"] == 2.0 and m["t2v_MeanR"] == 2.25
  # v2t: video 0's best text is text 0 (rank 1); video 1's text 2 is 3rd in its column
  # (0.5, 0.6 above); video 2's text 3 is 2nd (0.8 above).
  assert m["v2t_R1"] == pytest.approx(100 / 3) and m["v2t_R5"] == 100.0
  assert m["v2t_MedR"] == 2.0 and m["v2t_MeanR"] == 2.0
  assert m["num_texts"] == 4 and m["num_videos"] == 3
  # R@5 / R@10 with more videos: text ranked 6th counts for R@10 only.
  s = np.tile(np.arange(12, 0, -1, dtype=float), (1, 1))
  m = metrics.retrieval_metrics(s, np.array([5]))
  assert (m["t2v_R1"], m["t2v_R5"], m["t2v_R10"], m["t2v_MedR"]) == (0.0, 0.0, 100.0, 6.0)


def test_retrieval_ties_do_not_all_count_as_hits():
  m = metrics.retrieval_metrics(np.zeros((2, 2)), np.array([0, 1]))
  assert m["t2v_R1"] == 50.0 and m["v2t_R1"] == 50.0


def test_itm_rerank_shortlists_and_adds_itc():
  sim = np.array([[0.9, 0.8, 0.1],
                  [0.2, 0.7, 0.6],
                  [0.5, 0.4, 0.3]])
  calls = []

  def itm(t, v):  # ITM prefers video == text index strongly
    calls.append(len(t))
    return np.where(t == v, 10.0, 0.0)

  t2v, v2t = metrics.itm_rerank(sim, 2, itm, chunk=4)
  assert all(c == 4 for c in calls)  # fixed-size chunks (padded)
  assert t2v.shape == (3, 3) and v2t.shape == (3, 3)
  # Text 0 shortlist {0, 1}: 10 + 0.9 and 0 + 0.8; video 2 outside -> -100.
  np.testing.assert_allclose(t2v[0], [10.9, 0.8, -100.0])
  np.testing.assert_allclose(t2v[2], [0.5, 0.4, -100.0])  # its own video is not shortlisted
  # Video 2's top-2 texts by similarity: texts 1 (0.6), 2 (0.3).
  np.testing.assert_allclose(v2t[2], [-100.0, 0.6, 10.3])
  m = metrics.retrieval_metrics(t2v, np.arange(3), v2t)
  assert m["t2v_R1"] == pytest.approx(200 / 3)  # text 2 misses (video 2 not shortlisted)
  assert m["v2t_R1"] == 100.0
  # M1 image retrieval: the shortlisted pairs scored by the ITM logit alone.
  t2v, v2t = metrics.itm_rerank(sim, 2, itm, add_itc=False)
  np.testing.assert_allclose(t2v[0], [10.0, 0.0, -100.0])
  np.testing.assert_allclose(v2t[2], [-100.0, 0.0, 10.0])


# ---- classification and grounding ----------------------------------------------------


def test_topk_and_grounding_accuracy_by_hand():
  logits = np.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],
                     [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                     [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
  m = metrics.topk_accuracy(logits, np.array([1, 4, 6]))
  assert m["top1"] == pytest.approx(100 / 3) and m["top5"] == pytest.approx(200 / 3)
  gold = np.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
  pred = np.array([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])  # IoU 0.02 / 0.06 = 1/3
  np.testing.assert_allclose(metrics.box_iou(pred, gold), [1.0, 1 / 3])
  assert metrics.grounding_accuracy(pred, gold) == 50.0
  corners = np.array([[0.0, 0.0, 2.0, 2.0]])
  np.testing.assert_allclose(metrics.box_iou(corners, np.array([[1.0, 1.0, 3.0, 3.0]]),
                                             "xyxy"), [1 / 7])


# ---- evaluators end to end ------------------------------------------------------------

NUM_TEST = 5  # clips; QA has 3 questions per clip


def tiny_model(task: str) -> ml_collections.ConfigDict:
  from mplug2_jax import experiment

  cfg = experiment.base_config("tiny", task).model
  cfg.text.vocab_size = 30522  # the real BERT vocabulary of the demo tokenizer
  cfg.text.update(encoder_layers=2, universal_layers=1, fusion_layers=1, fusion_layers_built=1,
                  decoder_layers=1)
  cfg.vision.layers = 1
  if task == "classification":
    cfg.num_classes = 5
  return cfg


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  from mplug2_jax.data import build, demo

  root = tmp_path_factory.mktemp("eval_demo")
  paths = demo.make_demo(str(root), num_train=2, num_test=NUM_TEST, size=32, frames=4,
                         log=lambda *_: None)
  # A Kinetics-layout copy of the test clips (label = shape), for classification.
  rows = []
  for line in open(os.path.join(root, "raw", "video_qa_test.jsonl")):
    q = json.loads(line)
    if q["question"].startswith("what shape"):
      rows.append((q["answer"], q["video_id"]))
  kin = root / "kinetics"
  for label, vid in rows:
    os.makedirs(kin / label, exist_ok=True)
    shutil.copy(root / "raw" / "videos" / f"{vid}.mp4", kin / label / f"{vid}_000000_000001.mp4")
  with open(kin / "test.csv", "w") as f:
    f.write("label,youtube_id,time_start,time_end,split\n")
    f.writelines(f"{label},{vid},0,1,test\n" for label, vid in rows)
  paths["kinetics"] = build.build("kinetics", str(root / "kinetics_built"),
                                  {"test": [str(kin / "test.csv")]}, str(kin),
                                  max_bad_fraction=0.0, log=lambda *_: None)
  return paths


_PARAMS = {}


def tiny_params(task):
  from mplug2_jax import sharding
  from mplug2_jax.models import mplug2

  if task not in _PARAMS:
    cfg = tiny_model(task)
    model = mplug2.build(cfg)
    init = jax.jit(lambda b: sharding.unboxed(model.init(jax.random.key(0), b)["params"]))
    _PARAMS[task] = (cfg, init(mplug2.init_batch(cfg)))
  return _PARAMS[task]


def iterator(paths, kind, task, batch=4, index=0, count=1, sharding=None, **data):
  from mplug2_jax.data import default_data_config, pipeline

  d = default_data_config()
  d.vocab_file = VOCABS[0]
  d.mixture = ((paths[kind], 1.0),)
  d.task = task
  d.max_question_len = 12
  d.max_text_len = 16
  d.repeat_images = True
  d.update(data)
  return pipeline.make_iterator(d, split="test", batch_size=batch,
                                model_cfg=tiny_model("videoqa"), process_index=index,
                                process_count=count, sharding=sharding)


def settings(task, **kw):
  return common.eval_config(task, vocab_file=VOCABS[0], log_every=0, **kw)


def test_id_sets(demo_data):
  """Sanity of the fixture: the test splits hold NUM_TEST clips."""
  from mplug2_jax.data import records

  assert len(records.RecordSource(demo_data["video_caption"], "test")) == NUM_TEST
  assert len(records.RecordSource(demo_data["video_qa"], "test")) == 3 * NUM_TEST


@needs_java
def test_caption_end_to_end(demo_data, tmp_path):
  from mplug2_jax.evaluate import runner as cli

  cfg, params = tiny_params("caption")
  logs = []
  rows, m = common.evaluate("caption", cfg, params, iterator(demo_data, "video_caption", "caption"),
                           settings("caption"), log=logs.append)
  # 5 clips in batches of 4: one padding batch row set removed, each clip once.
  assert sorted(r["video_id"] for r in rows) == [f"demo_test_{i:05d}" for i in range(NUM_TEST)]
  assert all(len(r["gold_caption"]) == 3 and isinstance(r["pred_caption"], str) for r in rows)
  assert set(metrics.CAPTION_METRICS) <= set(m) and m["num"] == NUM_TEST
  assert any("done: 2 batches, 5 examples" in line for line in logs)
  config = ml_collections.ConfigDict(dict(eval=dict(split="test", submission=False),
                                          paper={"CIDEr": 0.803}, task="caption"))
  out = cli.write_outputs(tmp_path, "caption", rows, m, config, 1.0)
  saved = json.loads((out / "caption_result.json").read_text())
  assert set(saved[0]) == {"video_id", "pred_caption", "gold_caption"}
  assert json.loads((out / "metrics.json").read_text())["metrics"]["num"] == NUM_TEST
  assert "CIDEr" in cli.metric_table(m, {"CIDEr": 0.803})


def test_videoqa_generate_and_rank_end_to_end(demo_data):
  cfg, params = tiny_params("videoqa")
  rows, m = common.evaluate("videoqa", cfg, params, iterator(demo_data, "video_qa", "videoqa"),
                           settings("videoqa"), log=None)
  assert sorted(r["question_id"] for r in rows) == list(range(3 * NUM_TEST))
  assert m["num"] == 3 * NUM_TEST and 0.0 <= m["accuracy"] <= 100.0
  # The metric is the exact-match share of the rows.
  hits = sum(r["pred_answer"] == r["gold_answer"][0] for r in rows)
  assert m["accuracy"] == pytest.approx(100.0 * hits / len(rows))

  answers = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "left",
             "right", "up", "down"]
  rows, m = common.evaluate("videoqa", cfg, params, iterator(demo_data, "video_qa", "videoqa"),
                           settings("videoqa", qa_mode="rank", answer_list=answers, k_test=4),
                           log=None)
  assert len(rows) == 3 * NUM_TEST and all(r["pred_answer"] in answers for r in rows)
  hits = sum(r["pred_answer"] == r["gold_answer"][0] for r in rows)
  assert m["accuracy"] == pytest.approx(100.0 * hits / len(rows))


def test_retrieval_end_to_end(demo_data):
  cfg, params = tiny_params("retrieval")
  rows, m = common.evaluate("retrieval", cfg, params,
                           iterator(demo_data, "video_retrieval", "retrieval"),
                           settings("retrieval", retrieval_k=3, itm_chunk=8), log=None)
  assert m["num_texts"] == NUM_TEST and m["num_videos"] == NUM_TEST
  assert len(rows) == NUM_TEST and len({r["video_id"] for r in rows}) == NUM_TEST
  for key in ("t2v_R1", "t2v_R5", "t2v_R10", "t2v_MedR", "v2t_R1", "itc_t2v_R1"):
    assert key in m
  assert m["t2v_R5"] == 100.0  # 5 videos: every rank is <= 5
  # Every caption of each video (3 per demo test clip), read from the records.
  rows, m = common.evaluate("retrieval", cfg, params,
                           iterator(demo_data, "video_retrieval", "retrieval"),
                           settings("retrieval", retrieval_k=3, itm_chunk=8, all_texts=True,
                                    text_datasets=(demo_data["video_retrieval"],),
                                    max_text_len=16), log=None)
  assert m["num_texts"] == 3 * NUM_TEST and m["num_videos"] == NUM_TEST
  assert len(rows) == 3 * NUM_TEST


def test_sharded_evaluation_equals_single_device(demo_data):
  """8 devices (fsdp 4 x tensor 2): parameters sharded by the logical rules, each batch
  split over the data axes; the predictions and metrics equal the one-device run."""
  from mplug2_jax import experiment, sharding

  assert jax.device_count() == 8, "conftest must set 8 fake CPU devices"
  rules = experiment.base_config("tiny", "videoqa")
  rules.mesh.shape = (1, 4, 2)
  mesh = sharding.make_mesh(rules)
  batches = sharding.batch_sharding(mesh, rules)
  for task, kind, kw in (("videoqa", "video_qa", {}),
                         ("retrieval", "video_retrieval", dict(retrieval_k=3, itm_chunk=8))):
    cfg, params = tiny_params(task)
    want_rows, want = common.evaluate(task, cfg, params, iterator(demo_data, kind, task, batch=8),
                                     settings(task, **kw), log=None)
    rows, got = common.evaluate(task, cfg, params,
                               iterator(demo_data, kind, task, batch=8, sharding=batches),
                               settings(task, **kw), log=None, mesh=mesh, rules_config=rules)
    assert rows == want_rows, task
    assert got.keys() == want.keys()
    for k in got:
      assert got[k] == pytest.approx(want[k], abs=1e-6), (task, k)
  from mplug2_jax.models import mplug2
  shardings = sharding.param_shardings(mplug2.build(cfg), mplug2.init_batch(cfg), mesh, rules)
  placed = sharding.place(params, shardings)
  leaves = jax.tree.leaves(placed)
  assert all(x.sharding.mesh == mesh for x in leaves)
  assert any(not x.sharding.is_fully_replicated for x in leaves)  # really split


def test_classification_and_grounding_end_to_end(demo_data):
  cfg, params = tiny_params("classification")
  rows, m = common.evaluate("classification", cfg, params,
                           iterator(demo_data, "kinetics", "classification"),
                           settings("classification"), log=None)
  assert len(rows) == NUM_TEST and m["num"] == NUM_TEST
  assert m["top5"] == 100.0  # 5 classes (3 seen)
  # Grounding decodes box tokens with the QA modules (image-text records: zero boxes).
  cfg, params = tiny_params("videoqa")
  rows, m = common.evaluate("grounding", cfg, params,
                           iterator(demo_data, "image_text", "grounding"),
                           settings("grounding"), log=None)
  assert len(rows) == NUM_TEST and m["accuracy_iou50"] == 0.0
  assert all(0.0 <= v <= 1.0 for r in rows for v in r["pred_box"])


def test_two_processes_count_each_question_once(demo_data):
  """Simulated 2-process evaluation: each process's padded share, padding removed, union =
  the split exactly once (15 questions, local batch 2 -> 8 + 8 rows, 1 padding row)."""
  cfg, params = tiny_params("videoqa")
  seen = []
  for index in range(2):
    it = iterator(demo_data, "video_qa", "videoqa", batch=4, index=index, count=2)
    rows, _ = common.predict("videoqa", cfg, params, it,
                            settings("videoqa", max_length=2), log=None)
    seen += [r["question_id"] for r in rows]
  assert sorted(seen) == list(range(3 * NUM_TEST))


def test_allgather_single_process_is_identity():
  rows = [{"a": 1}]
  assert common.allgather_rows(rows) is rows
  arrays = {"x": np.zeros(3)}
  assert common.allgather_arrays(arrays) is arrays


@pytest.mark.slow
@needs_java
def test_cli_end_to_end(demo_data, tmp_path):
  """python -m mplug2_jax.evaluate on a saved tiny caption checkpoint."""
  from mplug2_jax import param_store

  cfg, params = tiny_params("caption")
  ckpt = param_store.save_params(tmp_path / "ckpt", params, cfg)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  arg = f"size=tiny,data={demo_data['video_caption']},vocab={VOCABS[0]},batch=4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(
      [sys.executable, "-m", "mplug2_jax.evaluate",
       f"--config={repo}/configs/eval/msrvtt_caption.py:{arg}", f"--checkpoint={ckpt}",
       f"--workdir={tmp_path / 'out'}", "--config.data.max_caption_len=20"],
      cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CIDEr" in proc.stdout and "0.803" in proc.stdout
  saved = json.loads((tmp_path / "out" / "caption_result.json").read_text())
  assert len(saved) == NUM_TEST


@pytest.mark.slow
def test_cli_two_processes_equal_one_process(demo_data, tmp_path):
  """python -m mplug2_jax.evaluate as 2 processes x 1 CPU device (jax.distributed from the
  JAX_* environment) writes the same predictions and metrics as 1 process x 2 devices:
  every question once, padding dropped, the batch split over both devices."""
  import socket
  from mplug2_jax import param_store

  cfg, params = tiny_params("videoqa")
  ckpt = param_store.save_params(tmp_path / "ckpt", params, cfg)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  arg = f"size=tiny,data={demo_data['video_qa']},vocab={VOCABS[0]},batch=4"

  def command(out):
    return [sys.executable, "-m", "mplug2_jax.evaluate",
            f"--config={repo}/configs/eval/msrvtt_qa.py:{arg}", f"--checkpoint={ckpt}",
            f"--workdir={out}", "--config.data.max_question_len=12"]

  def env(devices, **extra):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)

  one = subprocess.run(command(tmp_path / "one"), cwd=repo, env=env(2), capture_output=True,
                       text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen(command(tmp_path / "two"), cwd=repo, env=env(
      1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  read = lambda d: sorted(json.loads((tmp_path / d / "qa_result.json").read_text()),
                          key=lambda r: r["question_id"])
  assert [r["question_id"] for r in read("two")] == list(range(3 * NUM_TEST))
  assert read("two") == read("one")
  metric = lambda d: json.loads((tmp_path / d / "metrics.json").read_text())["metrics"]
  assert metric("two") == metric("one")


EVAL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "eval")
# Paper result rows (demo.py evaluates the demo dataset and has no paper number).
EVAL_CONFIGS = sorted(p for p in glob.glob(os.path.join(EVAL_DIR, "*.py"))
                      if os.path.basename(p) != "demo.py")


def test_demo_eval_config_per_task():
  import importlib.util

  spec = importlib.util.spec_from_file_location("demo_eval", os.path.join(EVAL_DIR, "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for task, kind in module.DATASETS.items():
    config = module.get_config(f"task={task},data=/d")
    assert config.task == task and config.data.mixture == ((f"/d/{kind}", 1.0),)
  assert module.get_config("task=retrieval").eval.all_texts
  from mplug2_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="demo eval task"):
    module.get_config("task=grounding")


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_eval_configs_load_and_state_the_paper_number(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("eval_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("size=tiny,data=/x,vocab=/v.txt")
  assert config.task in common.TASKS and config.data.mixture == (("/x", 1.0),)
  doc = module.__doc__
  # A marked paper number (a string, e.g. "87.1 (multi-view)") states its number too.
  number = lambda k, v: (v.split()[0] if isinstance(v, str)
                         else f"{v * (100 if k == 'CIDEr' else 1):.1f}")
  assert "[unverified]" in doc or all(number(k, v) in doc for k, v in config.paper.items())
