r"""mPLUG-Owl2 chat and evaluation decoding settings (`python -m mplug2_jax.chat`).

  mode=cli      the official CLI (`serve/cli.py:88-97, 113-114`): sampling at temperature
                0.2, up to 512 new tokens, stop on `</s>`, images padded to a square
  mode=readme   the README quick start (RD:440-457): temperature 0.7, 512 new tokens
  mode=vqa      the VQA / MME / MMBench benchmarks: greedy, 10 new tokens, prompt
                '... Answer the question using a single word or phrase.' (the
                benchmark scripts stretch images to a square: aspect=resize)
  mode=caption  the captioning benchmark: greedy, 60 new tokens

Arguments: mode, temperature / top_k / top_p / max_new_tokens (override the mode), batch
(prompts per generation call in batch mode).

  python -m mplug2_jax.chat --checkpoint /ckpt/owl2_7b --tokenizer tokenizer.model \
      --image photo.jpg --config configs/owl2_chat.py:mode=vqa
"""

import ml_collections

from mplug2_jax import config_lib

MODES = {
    "cli": dict(temperature=0.2, max_new_tokens=512, aspect="pad", suffix=""),
    "readme": dict(temperature=0.7, max_new_tokens=512, aspect="resize", suffix=""),
    "vqa": dict(temperature=0.0, max_new_tokens=10, aspect="resize",
                suffix=" Answer the question using a single word or phrase."),
    "caption": dict(temperature=0.0, max_new_tokens=60, aspect="resize", suffix=""),
}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, mode="cli", temperature=-1.0, top_k=0, top_p=1.0,
                           max_new_tokens=0, batch=8)
  config_lib.check(a.mode in MODES, "arg.mode", a.mode, f"must be one of {tuple(MODES)}")
  mode = MODES[a.mode]
  c = ml_collections.ConfigDict()
  c.generation = ml_collections.ConfigDict(dict(
      max_new_tokens=a.max_new_tokens or mode["max_new_tokens"],
      temperature=mode["temperature"] if a.temperature < 0 else a.temperature,
      top_k=a.top_k, top_p=a.top_p, stop_on_eos=True))
  c.image_aspect = mode["aspect"]   # data/instruction.py image_pixels: pad | resize | crop
  c.prompt_suffix = mode["suffix"]  # appended to every user question
  c.stop_strings = ("</s>",)        # the official KeywordsStoppingCriteria keyword
  c.batch_size = a.batch
  c.seed = 0
  return c
