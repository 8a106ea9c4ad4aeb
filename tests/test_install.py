"""The install metadata: ranges in setup.py, the exact tested set in constraints.txt (which
must satisfy them and match what is installed here), the shipped vocabulary, and Java as an
optional dependency named by the metric that needs it. (Resolution against PyPI for each
Python and extra: launch/check_install.sh.)"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_literals() -> dict:
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
      try:
        out[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        pass
    if isinstance(node, ast.keyword) and node.arg == "python_requires":
      out["python_requires"] = node.value.value
  return out


def norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
  pins = {}
  for line in open(os.path.join(REPO, "constraints.txt")):
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[norm(name)] = version
  return pins


def test_ranges_not_pins_and_constraints_satisfy_them():
  lit = setup_literals()
  assert SpecifierSet(lit["python_requires"]).contains("3.11")
  assert SpecifierSet(lit["python_requires"]).contains("3.12")
  pins = constraints()
  for text in lit["INSTALL_REQUIRES"] + lit["EXTRAS"]["test"]:
    req = Requirement(text)
    assert not any(s.operator == "==" for s in req.specifier), f"{text}: a pin, not a range"
    name = norm(req.name)
    assert name in pins, f"{name} is not in constraints.txt"
    assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def test_constraints_are_the_installed_versions():
  for name, version in constraints().items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pytest.fail(f"constraints.txt lists {name}=={version}, which is not installed")
    assert installed.split("+")[0] == version, (name, installed, version)


def test_vocabulary_is_package_data():
  setup = open(os.path.join(REPO, "setup.py")).read()
  assert 'package_data={"mplug2_jax.data": ["vocab/*.txt"]}' in setup
  vocab = os.path.join(REPO, "mplug2_jax", "data", "vocab")
  assert any(f.endswith(".txt") for f in os.listdir(vocab))


def test_missing_java_names_the_metric(monkeypatch):
  import shutil

  from mplug2_jax.evaluate import metrics

  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(RuntimeError, match=r"^caption metrics \(BLEU, METEOR, ROUGE-L, CIDEr"
                     r".* need Java on PATH"):
    metrics.caption_metrics({1: "a cat"}, {1: ["a cat"]})
