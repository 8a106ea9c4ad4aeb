"""Parameter counts of base / large equal the official modules each task uses.

The expected numbers are derived from the official key lists in shared/spec/mplug2_keys/
(every state-dict entry minus the keys the task never trains, tied copies and buffers
counted once) and cross-checked with the totals of its README. Only `jax.eval_shape`:
nothing is allocated.
"""

import json

import pytest

from mplug2_jax import experiment, sharding
from mplug2_jax.models import mplug2

# mplug2_keys/README.md, column "used by the task's training forward".
README_USED = {
    ("large", "caption"): 621_853_498,
    ("large", "videoqa"): 1_031_533_370,
    ("base", "caption"): 256_881_210,
    ("base", "videoqa"): 379_952_442,
}
TIED_COPIES = {"text_decoder.cls.predictions.decoder.weight",
               "text_decoder.cls.predictions.decoder.bias"}


def official_used_count(keys_dir, size, task):
  unused = set((keys_dir / f"{size}_{task}.unused.txt").read_text().split())
  total = 0
  for line in (keys_dir / f"{size}_{task}.tsv").read_text().splitlines():
    key, shape, dtype = line.split("\t")
    if key in unused or key in TIED_COPIES or dtype == "int64":
      continue
    n = 1
    for d in json.loads(shape):
      n *= d
    total += n
  return total


@pytest.mark.parametrize("size,task", sorted(README_USED))
def test_param_count_matches_official(shared_dir, size, task):
  expected = official_used_count(shared_dir / "spec" / "mplug2_keys", size, task)
  assert expected == README_USED[(size, task)]
  config = experiment.base_config(size, task)
  abstract = sharding.abstract_params(mplug2.build(config.model), mplug2.init_batch(config.model))
  assert sharding.count_params(abstract) == expected
