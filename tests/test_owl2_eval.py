"""mPLUG-Owl2 benchmark formats on small hand-written files in the official layouts, with
scores computed by hand in the comments."""

import json

import pytest

from mplug2_jax.evaluate import owl2_bench as bench


def test_vqa_v2_layout_and_accuracy(tmp_path):
  (tmp_path / "q.json").write_text(json.dumps({"questions": [
      {"question_id": 1, "image_id": 42, "question": "How many?"},
      {"question_id": 2, "image_id": 42, "question": "Is it red?"},
      {"question_id": 3, "image_id": 7, "question": "What?"}]}))
  answers = lambda xs: [{"answer": a} for a in xs]
  (tmp_path / "a.json").write_text(json.dumps({"annotations": [
      {"question_id": 1, "answers": answers(["2"] * 3 + ["3"] * 7)},
      {"question_id": 2, "answers": answers(["yes"] * 10)},
      {"question_id": 3, "answers": answers(["dog"] * 10)}]}))
  examples, golds = bench.read_gold("vqa_v2", [str(tmp_path / "q.json"), str(tmp_path / "a.json")])
  assert examples[0]["image"] == "COCO_val2014_000000000042.jpg"
  # q1: "two" -> "2" matches 3 of 10: leave-one-out mean (3 x 2/3 + 7 x 1) / 10 = 0.9;
  # q2: 1.0; q3: no prediction, 0. Mean 1.9 / 3.
  got = bench.score("vqa", {1: "two", 2: "yes"}, golds)
  assert got["accuracy"] == pytest.approx(100 * 1.9 / 3)


def test_gqa_exact_match(tmp_path):
  (tmp_path / "gqa.json").write_text(json.dumps({
      "a1": {"imageId": "n1", "question": "Color?", "answer": "red"},
      "a2": {"imageId": "n2", "question": "Side?", "answer": "left"}}))
  _, golds = bench.read_gold("gqa", [str(tmp_path / "gqa.json")])
  got = bench.score("vqa", {"a1": "Red.", "a2": "right"}, golds, metric="exact_match")
  assert got["exact_match"] == 50.0


@pytest.mark.parametrize("text,want", [
    ("B", "B"), ("The answer is C.", "C"), ("(A) cat", "A"), ("dog", "B"),
    ("I don't know", ""), ("A or B", ""), ("D", "")])
def test_extract_letter(text, want):
  assert bench.extract_letter(text, ["cat", "dog", "bird"]) == want


def test_mmbench_tsv_accuracy(tmp_path):
  rows = ["index\tquestion\tA\tB\tC\tD\tanswer\timage\tcategory",
          "0\tWhich animal?\tcat\tdog\tbird\t\tB\tAAAA\tanimals",
          "1\tWhich animal?\tcat\tdog\tbird\t\tC\tAAAA\tanimals",
          "2\tWhich animal?\tcat\tdog\tbird\t\tB\tAAAA\tanimals",
          "3\tWhich animal?\tcat\tdog\tbird\t\tB\tAAAA\tanimals",
          "4\tWhich animal?\tcat\tdog\tbird\t\tA\tAAAA\tanimals"]
  (tmp_path / "mmb.tsv").write_text("\n".join(rows) + "\n")
  examples, golds = bench.read_gold("mmbench_tsv", [str(tmp_path / "mmb.tsv")])
  assert examples[0]["options"] == ["cat", "dog", "bird"]
  preds = {0: "B", 1: "The answer is C.", 2: "(A) cat", 3: "dog", 4: "I don't know"}
  # Extracted B, C, A, B, "": right, right, wrong, right, wrong -> 60%.
  assert bench.score("choice", preds, golds)["accuracy"] == pytest.approx(60.0)
  assert bench.prompt("choice", "Which animal?", ["cat", "dog"]) == (
      "USER: <|image|>Which animal?\nA. cat\nB. dog\n"
      "Answer with the option's letter from the given choices directly. ASSISTANT: ")


def test_mme_scores(tmp_path):
  (tmp_path / "count.txt").write_text(
      "1.jpg\tIs there one cat?\tYes\n1.jpg\tAre there two cats?\tNo\n"
      "2.jpg\tIs there a dog?\tYes\n2.jpg\tAre there three dogs?\tNo\n")
  (tmp_path / "code_reasoning.txt").write_text(
      "3.png\tDoes it print 1?\tYes\n3.png\tDoes it print 2?\tNo\n")
  _, golds = bench.read_gold("mme", [str(tmp_path / "count.txt"),
                                     str(tmp_path / "code_reasoning.txt")])
  preds = dict(zip(golds, ["Yes", "No, there is not", "No", "no", "yes", "maybe"]))
  got = bench.score("yesno", preds, golds)
  # count: 3/4 right (75), images all right 1/2 (50) -> 125; code_reasoning: 1/2 (50),
  # no image all right (0) -> 50.
  assert got["count/acc"] == 75.0 and got["count/acc_plus"] == 50.0
  assert got["perception"] == 125.0 and got["cognition"] == 50.0


def test_mmlu_micro_and_macro(tmp_path):
  (tmp_path / "astronomy_test.csv").write_text("Q1?,a,b,c,d,A\nQ2?,a,b,c,d,B\n")
  (tmp_path / "law_test.csv").write_text("Q3?,a,b,c,d,D\n")
  examples, golds = bench.read_gold("mmlu_csv", [str(tmp_path / "astronomy_test.csv"),
                                                 str(tmp_path / "law_test.csv")])
  assert examples[0]["image"] == ""
  got = bench.score("text_mc", {"astronomy/0": "A", "astronomy/1": "C",
                                "law/0": "D."}, golds)
  # 2 of 3 right; subjects 50% and 100% -> macro 75%.
  assert got["accuracy"] == pytest.approx(200 / 3) and got["accuracy_macro"] == 75.0
  assert bench.prompt("text_mc", "Q1?", ["a", "b"], has_image=False).startswith("USER: Q1?\n")


def test_vqa_prompt_is_the_official_one():
  assert bench.prompt("vqa", "What is it?") == (
      "USER: <|image|>What is it? Answer the question using a single word or phrase. "
      "ASSISTANT: ")
  for name, row in bench.BENCHMARKS.items():
    assert row["format"] in bench.FORMATS, name


def test_every_row_has_a_config_with_its_paper_number():
  from mplug2_jax import experiment

  for name, row in bench.BENCHMARKS.items():
    config = experiment.load(f"configs/owl2_eval.py:bench={name},gold=/a.json+/b.json")
    assert (config.format, config.max_new_tokens, config.gold) == (
        row["format"], row["max_new_tokens"], ("/a.json", "/b.json"))
    if row["paper"] is not None:
      assert f"{name} {row['paper']}" in open("configs/owl2_eval.py").read()
